"""Checkpoints written by metatrain's own ``experimental.mace``, recognised.

With this package installed, ``experimental.mace`` means metatrain-mace, also when
metatrain reads a checkpoint. metatrain's in-tree copy stores another model under
the same name (``model_data["hypers"]`` and a MACE under ``mace_model.*``, where
this package stores ``model_data["model_hypers"]``), with its own version numbers,
so that metatrain's message for them ("only supports up to version 3 ... upgrade
metatrain") sends users the wrong way. They are refused with the cause and the way
out: ``METATRAIN_MACE_DISABLE=1`` hands ``experimental.mace`` back to metatrain.
"""

from typing import Any, Dict


def is_intree_checkpoint(checkpoint: Dict[str, Any]) -> bool:
    """Whether ``checkpoint`` was written by metatrain's in-tree
    ``experimental.mace`` (not by this package)."""
    if not isinstance(checkpoint, dict):
        return False
    if checkpoint.get("architecture_name") != "experimental.mace":
        return False
    model_data = checkpoint.get("model_data")
    return (
        isinstance(model_data, dict)
        and "hypers" in model_data
        and "model_hypers" not in model_data
    )


def refuse_intree_checkpoint(checkpoint: Dict[str, Any]) -> None:
    """Raise a clear error for a checkpoint of metatrain's in-tree
    ``experimental.mace``; do nothing for any other checkpoint."""
    if not is_intree_checkpoint(checkpoint):
        return
    version = checkpoint.get("model_ckpt_version", "unknown")
    raise ValueError(
        "this checkpoint was written by metatrain's own 'experimental.mace' "
        f"(its model checkpoint version {version}), not by metatrain-mace, which "
        "is installed and now answers for 'experimental.mace': the two store "
        "different models under the same name. Use metatrain's own copy for it by "
        "setting METATRAIN_MACE_DISABLE=1, for example "
        "'METATRAIN_MACE_DISABLE=1 mtt export model.ckpt' (metatrain's copy works "
        "with the mace-torch version metatrain pins for it), or train a new model "
        "with metatrain-mace"
    )
