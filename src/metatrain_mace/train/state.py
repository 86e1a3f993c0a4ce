"""The state of a training run: what checkpoints save and restarts restore.

:class:`TrainingState` is the one place that names these fields. The checkpoint
keeps them as flat keys next to the model's (trainer checkpoint version 4), in the
order of :data:`CHECKPOINT_KEYS`.
"""

import copy
import dataclasses
import logging
import math
from typing import Any, Dict, List, Optional

import torch

from metatrain_mace.train.defaults import HYPER_DEFAULTS
from metatrain_mace.train.recipe import WeightAverage


CHECKPOINT_KEYS = (
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
"""The trainer's keys of a checkpoint, in the order in which they are written."""


@dataclasses.dataclass
class TrainingState:
    """Progress of a training run, and the states of its optimizer, schedules and
    weight average.

    ``hyper_defaults`` is the generation of training defaults the run began
    under (see :mod:`metatrain_mace.train.defaults`); a restart keeps it.
    ``restarted_targets`` and ``restarted_cueq`` describe the checkpoint a
    ``--restart`` continues (its target names and whether it ran
    cuEquivariance); they are not saved in checkpoints."""

    epoch: Optional[int] = None
    optimizer_state_dict: Optional[Dict[str, Any]] = None
    scheduler_state_dict: Optional[Dict[str, Any]] = None
    best_epoch: Optional[int] = None
    best_metric: Optional[float] = None
    best_model_state_dict: Optional[Dict[str, Any]] = None
    best_optimizer_state_dict: Optional[Dict[str, Any]] = None
    ema_state: Optional[Dict[str, Any]] = None
    stage_two_scheduler_state_dict: Optional[Dict[str, Any]] = None
    hyper_defaults: int = HYPER_DEFAULTS
    restarted_targets: Optional[List[str]] = None
    restarted_cueq: Optional[bool] = None

    def to_checkpoint(self) -> Dict[str, Any]:
        """The trainer's entries of a checkpoint (flat keys)."""
        return {key: getattr(self, key) for key in CHECKPOINT_KEYS}

    @classmethod
    def from_checkpoint(cls, checkpoint: Dict[str, Any]) -> "TrainingState":
        """The state saved in ``checkpoint``, which a ``--restart`` continues."""
        model_data = checkpoint["model_data"]
        return cls(
            **{key: checkpoint[key] for key in CHECKPOINT_KEYS},
            restarted_targets=list(model_data["dataset_info"].targets),
            restarted_cueq=bool(model_data["model_hypers"].get("enable_cueq", False)),
        )

    @property
    def next_epoch(self) -> int:
        """The first epoch to run."""
        return 0 if self.epoch is None else self.epoch + 1

    def start(self) -> None:
        """Before the first epoch of this run: no best model yet."""
        if self.best_metric is None:
            self.best_metric = math.inf

    def select_by(self, metric: Optional[str], recorded: Optional[str]) -> None:
        """Continue selecting the best model by ``metric`` when the run recorded
        it selected by ``recorded``: values of two different metrics cannot be
        compared, so a changed metric tracks the best model afresh (the next
        epoch becomes the best one)."""
        if None in (metric, recorded) or recorded == metric or self.best_metric is None:
            return
        logging.warning(
            f"best_model_metric changed from {recorded!r} to {metric!r} at this "
            f"restart: the best model so far (epoch {self.best_epoch}, "
            f"{recorded} {self.best_metric:.6g}) cannot be compared with "
            f"{metric!r}, so the best model is tracked afresh from the next epoch "
            "on. Restart with the recorded metric to keep it."
        )
        self.best_metric = math.inf

    def record_if_best(
        self,
        metric: float,
        epoch: int,
        model: Any,
        optimizer: torch.optim.Optimizer,
    ) -> bool:
        """Keep the weights of ``model`` as the best model when ``metric`` is the
        lowest yet; whether it is."""
        if not metric < self.best_metric:  # type: ignore[operator]
            return False
        self.best_metric = metric
        self.best_epoch = epoch
        # e3nn weights, as every checkpoint (see get_checkpoint)
        self.best_model_state_dict = copy.deepcopy(model.e3nn_copy().state_dict())
        self.best_optimizer_state_dict = copy.deepcopy(optimizer.state_dict())
        return True

    def keep(
        self,
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        average: Optional[WeightAverage],
        stage_two_scheduler: Any,
    ) -> None:
        """Take the current states of the optimizer, the schedules and the weight
        average (for checkpoints and restarts)."""
        self.optimizer_state_dict = optimizer.state_dict()
        self.scheduler_state_dict = scheduler.state_dict()
        self.ema_state = None if average is None else average.state_dict()
        self.stage_two_scheduler_state_dict = (
            None if stage_two_scheduler is None else stage_two_scheduler.state_dict()
        )

    def new_targets(self, model: Any) -> List[str]:
        """The targets of ``model`` that the restarted checkpoint did not train
        (none without a restart)."""
        if self.restarted_targets is None:
            return []
        return [
            name
            for name in model.dataset_info.targets
            if name not in self.restarted_targets
        ]

    def check_backend(self, model: Any) -> None:
        """Refuse a ``--restart`` with another ``enable_cueq`` than the
        checkpoint's: its optimizer state belongs to the other backend."""
        if self.restarted_cueq is None:
            return
        if bool(model.hypers["enable_cueq"]) != self.restarted_cueq:
            raise ValueError(
                "'enable_cueq' changed on --restart: the optimizer state "
                "belongs to the other backend. Continue with 'enable_cueq: "
                f"{str(self.restarted_cueq).lower()}', or start a fine-tuning "
                "('finetune: read_from') to switch backends."
            )
