"""Checkpoint upgrades between versions of the model and trainer checkpoints.

Each entry of ``MODEL_UPDATES`` / ``TRAINER_UPDATES`` maps version ``v`` to a
function updating a checkpoint dict from ``v`` to ``v + 1`` in place. Version 1 is
the first published format; model version 2 adds ``model_data["mace_trunk"]``.
"""

from typing import Any, Callable, Dict


Update = Callable[[Dict[str, Any]], None]


def _model_v1_to_v2(checkpoint: Dict[str, Any]) -> None:
    """v2 stores the MACE trunk of models loaded from a MACE file (none before)."""
    checkpoint["model_data"]["mace_trunk"] = None


MODEL_UPDATES: Dict[int, Update] = {1: _model_v1_to_v2}
TRAINER_UPDATES: Dict[int, Update] = {}


def upgrade(
    checkpoint: Dict[str, Any], kind: str, current: int, updates: Dict[int, Update]
) -> Dict[str, Any]:
    """Apply the updates from the checkpoint's ``<kind>_ckpt_version`` on."""
    key = f"{kind}_ckpt_version"
    version = checkpoint[key]
    while version in updates and version < current:
        updates[version](checkpoint)
        version += 1
        checkpoint[key] = version
    if version != current:
        raise RuntimeError(
            f"Unable to upgrade the checkpoint: the checkpoint is using {kind} "
            f"version {checkpoint[key]}, while the current {kind} version is "
            f"{current}."
        )
    return checkpoint
