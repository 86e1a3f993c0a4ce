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


def read_checkpoint(name: str) -> dict:
    with gzip.open(CHECKPOINTS / name) as file:
        return torch.load(file, weights_only=False, map_location="cpu")


def old_checkpoint() -> dict:
    """The newest checkpoint of trainer version 3 (a run with no EMA), upgraded."""
    checkpoint = read_checkpoint("model-v7_trainer-v3.ckpt.gz")
    assert checkpoint["train_hypers"]["ema_decay"] is None
    return Trainer.upgrade_checkpoint(checkpoint)


def test_the_defaults_that_changed() -> None:
    assert HYPER_DEFAULTS == 5
    assert defaults()["ema_decay"] == 0.99
    assert defaults()["best_model_metric"] == "loss"
    assert changed_since(3) == {"ema_decay": None, "best_model_metric": "mae_prod"}
    assert changed_since(4) == {"best_model_metric": "mae_prod"}
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
    assert trainer.hypers["best_model_metric"] == "mae_prod"
    assert "began under earlier defaults" in caplog.text
    # and keeps its generation in the checkpoints it writes
    assert trainer.state.hyper_defaults == 3
    assert trainer.state.to_checkpoint()["hyper_defaults"] == 3

    # fine-tuning from it is a new run, with today's defaults
    finetuning = Trainer.load_checkpoint(checkpoint, defaults(), context="finetune")
    assert finetuning.hypers["ema_decay"] == 0.99
    assert finetuning.hypers["best_model_metric"] == "loss"
    assert finetuning.state.hyper_defaults == HYPER_DEFAULTS


def test_a_generation_four_run_keeps_selecting_by_mae_prod(caplog) -> None:
    """A run begun under the EMA defaults (trainer version 4) restarts with the
    metric its best model was chosen by: its recorded best value is a product of
    MAEs, which a validation loss cannot be compared with."""
    caplog.set_level(logging.INFO)
    checkpoint = read_checkpoint("model-v7_trainer-v4.ckpt.gz")
    assert checkpoint["hyper_defaults"] == 4
    checkpoint = Trainer.upgrade_checkpoint(checkpoint)
    trainer = Trainer.load_checkpoint(checkpoint, defaults(), context="restart")
    assert trainer.hypers["best_model_metric"] == "mae_prod"
    assert trainer.hypers["ema_decay"] == 0.99
    assert "recorded best_model_metric: mae_prod" in caplog.text
    assert "today's default: best_model_metric: loss" in caplog.text
    assert trainer.state.best_metric == checkpoint["best_metric"]


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


def test_a_restart_with_another_metric_tracks_the_best_model_afresh(caplog) -> None:
    """The recorded best value is a product of MAEs: a restart that selects by
    another metric must not compare its values with it (a loss larger than the
    recorded product would never become the best, and the export would keep
    the model of before the restart without a word)."""
    checkpoint = Trainer.upgrade_checkpoint(
        read_checkpoint("model-v7_trainer-v4.ckpt.gz")
    )
    assert checkpoint["train_hypers"]["best_model_metric"] == "mae_prod"
    assert 0 < checkpoint["best_metric"] < float("inf")
    asked = dict(defaults(), best_model_metric="rmse_prod")
    trainer = Trainer.load_checkpoint(checkpoint, asked, context="restart")
    assert trainer.hypers["best_model_metric"] == "rmse_prod"
    assert trainer.state.best_metric == float("inf")
    assert "changed from 'mae_prod' to 'rmse_prod'" in caplog.text
    assert "tracked afresh" in caplog.text
    # the earlier best model stays until an epoch after the restart replaces it
    assert trainer.state.best_epoch == checkpoint["best_epoch"]

    # the same metric keeps the recorded best
    caplog.clear()
    kept = Trainer.load_checkpoint(
        checkpoint, dict(defaults(), best_model_metric="mae_prod"), "restart"
    )
    assert kept.state.best_metric == checkpoint["best_metric"]
    assert "tracked afresh" not in caplog.text
