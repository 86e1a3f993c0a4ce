"""Names shared by the model's modules: the architecture and its auxiliary outputs."""

ARCHITECTURE_NAME = "experimental.mace"
MACE_FEATURES = "mtt::aux::mace_features"


def last_layer_features_name(target_name: str) -> str:
    """Name of the auxiliary output holding the last-layer features of a target."""
    return "mtt::aux::" + target_name.replace("mtt::", "") + "_last_layer_features"
