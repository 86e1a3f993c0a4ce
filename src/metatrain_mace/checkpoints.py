"""Checkpoint upgrades between versions of the model and trainer checkpoints.

Each entry of ``MODEL_UPDATES`` / ``TRAINER_UPDATES`` maps version ``v`` to a
function updating a checkpoint dict from ``v`` to ``v + 1`` in place. Version 1 is
the first published format; model version 2 adds ``model_data["mace_trunk"]``,
model version 3 the ``embedding_specs`` hyper, model version 4 the
``enable_cueq`` hyper, trainer version 2 the
``frozen_layers`` and ``lr_factors`` hypers, trainer version 3 the EMA and stage
two of MACE's recipe.
"""

from typing import Any, Callable, Dict


Update = Callable[[Dict[str, Any]], None]


def _model_v1_to_v2(checkpoint: Dict[str, Any]) -> None:
    """v2 stores the MACE trunk of models loaded from a MACE file (none before)."""
    checkpoint["model_data"]["mace_trunk"] = None


def _model_v2_to_v3(checkpoint: Dict[str, Any]) -> None:
    """v3 has the ``embedding_specs`` hyper (charge/spin conditioning; none
    before)."""
    for key in ("model_data",):
        hypers = checkpoint.get(key, {}).get("model_hypers")
        if hypers is not None:
            hypers.setdefault("embedding_specs", None)


def _trainer_v1_to_v2(checkpoint: Dict[str, Any]) -> None:
    """v2 has ``frozen_layers`` and ``lr_factors``, and one optimizer group per
    block (a v1 optimizer state is reset on restart, with a warning)."""
    hypers = checkpoint.get("train_hypers")
    if hypers is not None:
        hypers.setdefault("frozen_layers", 0)
        hypers.setdefault("lr_factors", {})


def _model_v3_to_v4(checkpoint: Dict[str, Any]) -> None:
    """v4 has the ``enable_cueq`` hyper (cuEquivariance; e3nn before)."""
    hypers = checkpoint.get("model_data", {}).get("model_hypers")
    if hypers is not None:
        hypers.setdefault("enable_cueq", False)


MODEL_UPDATES: Dict[int, Update] = {
    1: _model_v1_to_v2,
    2: _model_v2_to_v3,
    3: _model_v3_to_v4,
}


def _trainer_v2_to_v3(checkpoint: Dict[str, Any]) -> None:
    """v3 has MACE's recipe: ``ema_decay`` and the ``stage_two_*`` hypers, and the
    weight average and stage-two scheduler states (none before)."""
    hypers = checkpoint.get("train_hypers")
    if hypers is not None:
        hypers.setdefault("ema_decay", None)
        hypers.setdefault("stage_two_epoch", None)
        hypers.setdefault("stage_two_loss", None)
        hypers.setdefault("stage_two_learning_rate", 1e-3)
    checkpoint.setdefault("ema_state", None)
    checkpoint.setdefault("stage_two_scheduler_state_dict", None)


TRAINER_UPDATES: Dict[int, Update] = {1: _trainer_v1_to_v2, 2: _trainer_v2_to_v3}


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
