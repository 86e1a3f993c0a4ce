"""Changed training defaults: new runs get them, restarts of older runs keep the
values they began with."""

import gzip
import logging
from pathlib import Path

import pytest
import torch
from metatrain.utils.architectures import get_default_hypers

from metatrain_mace.train.defaults import (
    HYPER_DEFAULTS,
    changed_since,
    restart_hypers,
)
from metatrain_mace.train.state import TrainingState
from metatrain_mace.trainer import Trainer


CHECKPOINTS = Path(__file__).parents[1] / "checkpoints"


def defaults() -> dict:
    return dict(get_default_hypers("experimental.mace")["training"])


def old_checkpoint() -> dict:
    """The newest checkpoint of trainer version 3 (a run with no EMA), upgraded."""
    path = CHECKPOINTS / "model-v7_trainer-v3.ckpt.gz"
    with gzip.open(path) as file:
        checkpoint = torch.load(file, weights_only=False, map_location="cpu")
    assert checkpoint["train_hypers"]["ema_decay"] is None
    return Trainer.upgrade_checkpoint(checkpoint)


def test_the_defaults_that_changed() -> None:
    assert HYPER_DEFAULTS == 4
    assert defaults()["ema_decay"] == 0.99
    assert changed_since(3) == {"ema_decay": None}
    assert changed_since(HYPER_DEFAULTS) == {}


def test_restart_keeps_recorded_values_of_changed_defaults(caplog) -> None:
    caplog.set_level(logging.INFO)
    hypers = defaults()
    recorded = dict(hypers, ema_decay=None, learning_rate=0.005)
    restarted = restart_hypers(hypers, recorded, generation=3)
    # the changed default is put back; the rest comes from the options
    assert restarted["ema_decay"] is None
    assert restarted["learning_rate"] == hypers["learning_rate"]
    assert "continues it with its recorded ema_decay: None" in caplog.text
    assert "today's default: ema_decay: 0.99" in caplog.text
    assert hypers["ema_decay"] == 0.99  # the options are not modified

    # an options file that asks for another value wins
    asked = dict(hypers, ema_decay=0.9)
    assert restart_hypers(asked, recorded, generation=3)["ema_decay"] == 0.9
    # a run begun under today's defaults, or one that recorded the new value
    assert restart_hypers(hypers, recorded, HYPER_DEFAULTS)["ema_decay"] == 0.99
    same = dict(recorded, ema_decay=0.99)
    assert restart_hypers(hypers, same, generation=3)["ema_decay"] == 0.99
    # hypers recorded before the hyper existed had its earlier default
    older = {k: v for k, v in recorded.items() if k != "ema_decay"}
    assert restart_hypers(hypers, older, generation=3)["ema_decay"] is None


def test_an_old_checkpoint_restarts_with_its_recorded_hypers(caplog) -> None:
    caplog.set_level(logging.INFO)
    checkpoint = old_checkpoint()
    assert checkpoint["trainer_ckpt_version"] == Trainer.__checkpoint_version__
    assert checkpoint["hyper_defaults"] == 3

    trainer = Trainer.load_checkpoint(checkpoint, defaults(), context="restart")
    assert trainer.hypers["ema_decay"] is None
    assert "began under earlier defaults" in caplog.text
    # and keeps its generation in the checkpoints it writes
    assert trainer.state.hyper_defaults == 3
    assert trainer.state.to_checkpoint()["hyper_defaults"] == 3

    # fine-tuning from it is a new run, with today's defaults
    finetuning = Trainer.load_checkpoint(checkpoint, defaults(), context="finetune")
    assert finetuning.hypers["ema_decay"] == 0.99
    assert finetuning.state.hyper_defaults == HYPER_DEFAULTS


def test_a_new_run_records_todays_defaults() -> None:
    assert TrainingState().hyper_defaults == HYPER_DEFAULTS
    checkpoint = old_checkpoint()
    checkpoint["hyper_defaults"] = HYPER_DEFAULTS
    checkpoint["train_hypers"]["ema_decay"] = None  # chosen by the user
    trainer = Trainer.load_checkpoint(
        checkpoint, dict(defaults(), ema_decay=None), context="restart"
    )
    assert trainer.hypers["ema_decay"] is None
    trainer = Trainer.load_checkpoint(checkpoint, defaults(), context="restart")
    assert trainer.hypers["ema_decay"] == pytest.approx(0.99)
