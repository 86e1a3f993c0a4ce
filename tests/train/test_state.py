"""The training state: checkpoint keys, and what a restart decides from the
checkpoint it continues (new targets, the backend)."""

from types import SimpleNamespace

import pytest
import torch

from metatrain_mace.train.state import CHECKPOINT_KEYS, TrainingState
from metatrain_mace.train.updates import restore_optimizer


def checkpoint(targets, enable_cueq=None) -> dict:
    hypers = {} if enable_cueq is None else {"enable_cueq": enable_cueq}
    data = {key: None for key in CHECKPOINT_KEYS}
    data.update(epoch=4, best_epoch=3, best_metric=0.5)
    return {
        "model_data": {
            "dataset_info": SimpleNamespace(targets={name: None for name in targets}),
            "model_hypers": hypers,
        },
        **data,
    }


def model(targets, enable_cueq=False):
    return SimpleNamespace(
        dataset_info=SimpleNamespace(targets={name: None for name in targets}),
        hypers={"enable_cueq": enable_cueq},
    )


def test_the_checkpoint_keys_are_those_of_trainer_checkpoint_version_4() -> None:
    assert CHECKPOINT_KEYS == (
        "epoch",
        "optimizer_state_dict",
        "scheduler_state_dict",
        "best_epoch",
        "best_metric",
        "best_model_state_dict",
        "best_optimizer_state_dict",
        "ema_state",
        "stage_two_scheduler_state_dict",
        "hyper_defaults",
    )
    state = TrainingState.from_checkpoint(checkpoint(["energy"]))
    assert state.to_checkpoint() == {
        key: checkpoint(["energy"])[key] for key in CHECKPOINT_KEYS
    }
    assert list(state.to_checkpoint()) == list(CHECKPOINT_KEYS)
    assert state.next_epoch == 5 and TrainingState().next_epoch == 0


def test_a_restart_knows_the_targets_and_the_backend_of_its_checkpoint() -> None:
    state = TrainingState.from_checkpoint(checkpoint(["energy"], enable_cueq=True))
    assert state.restarted_targets == ["energy"] and state.restarted_cueq is True
    assert state.new_targets(model(["energy"], True)) == []
    assert state.new_targets(model(["energy", "mtt::dipole"], True)) == ["mtt::dipole"]
    state.check_backend(model(["energy"], True))
    with pytest.raises(ValueError) as error:
        state.check_backend(model(["energy"], False))
    assert str(error.value) == (
        "'enable_cueq' changed on --restart: the optimizer state belongs to the "
        "other backend. Continue with 'enable_cueq: true', or start a fine-tuning "
        "('finetune: read_from') to switch backends."
    )
    # checkpoints without 'enable_cueq' ran e3nn
    older = TrainingState.from_checkpoint(checkpoint(["energy"]))
    with pytest.raises(ValueError, match="Continue with 'enable_cueq: false'"):
        older.check_backend(model(["energy"], True))
    # no restart: nothing to compare with
    TrainingState().check_backend(model(["energy"], True))
    assert TrainingState().new_targets(model(["energy"])) == []


def test_new_targets_start_the_optimizer_afresh() -> None:
    parameter = torch.nn.Parameter(torch.ones(2))
    saved = torch.optim.Adam([parameter], lr=0.1)
    parameter.grad = torch.ones(2)
    saved.step()
    state = TrainingState.from_checkpoint(checkpoint(["energy"]))
    state.optimizer_state_dict = saved.state_dict()

    def restored(targets) -> bool:
        optimizer = torch.optim.Adam([parameter], lr=0.1)
        scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, 0.5)
        restore_optimizer(optimizer, scheduler, state, model(targets))
        return len(optimizer.state) > 0

    assert restored(["energy"])
    assert not restored(["energy", "mtt::dipole"])
