"""Which targets the heads can produce, decided before anything is trained."""

from metatrain.utils.data import TargetInfo

from metatrain_mace.heads import irrep_of_block
from metatrain_mace.mace_import import o3


def check_target(name: str, info: TargetInfo, feature_irreps: o3.Irreps) -> None:
    """Refuse targets whose heads could not produce them.

    :param name: target name, used in the error messages.
    :param info: the target's metatrain description.
    :param feature_irreps: irreps of the concatenated MACE node features.
    """
    if info.is_atomic_basis:
        raise ValueError(
            f"target '{name}' is given in an atomic basis, which metatrain-mace does "
            "not support; use a per-atom spherical target without the per-type basis"
        )
    if info.sample_kind not in ("system", "atom"):
        raise ValueError(
            f"target '{name}' has samples per {info.sample_kind!r}; metatrain-mace "
            "predicts per-atom and per-structure targets only"
        )
    for block in info.layout.blocks():
        if len(block.components) > 1:
            raise ValueError(
                f"target '{name}' is a tensor of rank {len(block.components)}; "
                "metatrain-mace supports scalars, vectors (rank 1) and single "
                "spherical irreps per block. Split it into irreducible spherical "
                "blocks instead."
            )
    if info.is_spherical:
        available = {irrep for _, irrep in feature_irreps}
        for key in info.layout.keys:
            irrep = irrep_of_block(int(key["o3_lambda"]), int(key["o3_sigma"]))
            if irrep not in available:
                raise ValueError(
                    f"target '{name}' needs the irrep {irrep} (o3_lambda="
                    f"{int(key['o3_lambda'])}, o3_sigma={int(key['o3_sigma'])}), "
                    f"but the MACE node features only hold {feature_irreps}. Add "
                    f"'{irrep}' to 'hidden_irreps' (and make 'max_ell' at least "
                    f"{irrep.l})."
                )
    if info.is_cartesian and o3.Irrep("1o") not in {i for _, i in feature_irreps}:
        raise ValueError(
            f"target '{name}' is a vector, which needs '1o' node features, but the "
            f"MACE node features only hold {feature_irreps}. Add '1o' to "
            "'hidden_irreps', e.g. '128x0e + 128x1o'."
        )
