"""What updates the weights during a run: the losses, the optimizer and its
learning-rate schedules, the weight average (EMA) and stage two, set up once
before the first epoch and restored from a restarted checkpoint.

The optimizer itself (parameter groups, Adam/AdamW, the schedules) is built in
:mod:`metatrain_mace.train.optimizer`, the recipe in
:mod:`metatrain_mace.train.recipe`."""

import logging
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple, cast

import torch
from metatrain.utils.loss import LossAggregator, LossSpecification

from metatrain_mace.train.optimizer import (
    base_learning_rate,
    build_optimizer,
    build_scheduler,
    freeze_layers,
    same_layout,
    step_scheduler,
)
from metatrain_mace.train.recipe import (
    WeightAverage,
    in_stage_two,
    log_stage_two,
    stage_two_loss,
    stage_two_scheduler,
)
from metatrain_mace.train.state import TrainingState


@dataclass
class Optimization:
    """The losses, optimizer, schedules and weight average of a run.

    :param stage_two: the stage-two learning-rate schedule, from the first epoch of
        stage two on (``None`` before).
    """

    loss_fn: LossAggregator
    stage_two_fn: Optional[LossAggregator]
    optimizer: torch.optim.Optimizer
    scheduler: Any
    average: Optional[WeightAverage]
    stage_two: Any = None

    @property
    def loss(self) -> LossAggregator:
        """The loss of the current epoch (stage two has its own)."""
        if self.stage_two is None:
            return self.loss_fn
        return cast(LossAggregator, self.stage_two_fn)

    @property
    def learning_rate(self) -> float:
        return base_learning_rate(self.optimizer)

    def enter_stage_two(self, hypers: Dict[str, Any], epoch: int) -> bool:
        """Switch to stage two at its first epoch; whether it switched now."""
        if self.stage_two is not None or not in_stage_two(hypers, epoch):
            return False
        log_stage_two(hypers, epoch)
        self.stage_two = stage_two_scheduler(
            self.optimizer, hypers["stage_two_learning_rate"]
        )
        return True

    def step_schedules(self, validation_loss: float) -> None:
        """Advance the learning rate by one epoch."""
        if self.stage_two is not None:
            self.stage_two.step()  # the plateau scheduler stops in stage two
        else:
            step_scheduler(self.scheduler, validation_loss)

    def keep(self, state: TrainingState) -> None:
        """Save the current states into ``state`` (checkpoints, restarts)."""
        state.keep(self.optimizer, self.scheduler, self.average, self.stage_two)


def build_losses(
    targets: Dict[str, Any], hypers: Dict[str, Any]
) -> Tuple[LossAggregator, Optional[LossAggregator]]:
    """metatrain's loss of ``loss``, and the one of stage two when there is one."""
    loss_hypers = cast(Dict[str, LossSpecification], hypers["loss"])
    loss_fn = LossAggregator(targets=targets, config=loss_hypers)
    logging.info("Loss functions:")
    for name, info in loss_fn.metadata.items():
        logging.info(f"  {name}: {info}")
    stage_two_fn = None
    if hypers["stage_two_epoch"] is not None:
        stage_two_fn = LossAggregator(
            targets=targets,
            config=stage_two_loss(loss_hypers, hypers["stage_two_loss"]),
        )
    return loss_fn, stage_two_fn


def restore_optimizer(
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    state: TrainingState,
    model: Any,
) -> None:
    """The optimizer and schedule states of a restarted checkpoint, unless the
    model has targets that the checkpoint did not train or other parameter
    groups."""
    if state.optimizer_state_dict is None or state.new_targets(model):
        return
    if same_layout(optimizer, state.optimizer_state_dict):
        optimizer.load_state_dict(state.optimizer_state_dict)
        if state.scheduler_state_dict is not None:
            scheduler.load_state_dict(state.scheduler_state_dict)
    else:
        logging.warning(
            "The optimizer state of the checkpoint has other parameter "
            "groups (an older checkpoint, or changed 'frozen_layers', "
            "'lr_factors' or fine-tuning): the optimizer and the learning "
            "rate schedule start afresh"
        )


def build_average(
    model: Any, hypers: Dict[str, Any], state: TrainingState
) -> Optional[WeightAverage]:
    """The weight average (with ``ema_decay``), continued from a restart."""
    if hypers["ema_decay"] is None:
        return None
    average = WeightAverage(model, hypers["ema_decay"])
    if state.ema_state is not None and not average.load_state_dict(state.ema_state):
        logging.warning(
            "The weight average of the checkpoint describes other "
            "parameters: it starts afresh from the current weights"
        )
    logging.info(
        f"Exponential moving average of the weights, decay "
        f"{hypers['ema_decay']}: validation, the best model, "
        "checkpoints and the export use the averaged weights"
    )
    return average


def resume_stage_two(
    optimizer: torch.optim.Optimizer,
    hypers: Dict[str, Any],
    state: TrainingState,
    start_epoch: int,
) -> Any:
    """The stage-two schedule of a restart inside stage two (one at its first
    epoch switches in the loop), else ``None``."""
    if not in_stage_two(hypers, start_epoch - 1):
        return None
    log_stage_two(hypers, start_epoch)
    scheduler = stage_two_scheduler(optimizer, hypers["stage_two_learning_rate"])
    if state.stage_two_scheduler_state_dict is not None:
        scheduler.load_state_dict(state.stage_two_scheduler_state_dict)
    return scheduler


def set_up_optimization(
    model: Any, hypers: Dict[str, Any], state: TrainingState, start_epoch: int
) -> Optimization:
    """Losses, frozen layers, optimizer, schedules and weight average of a run
    that starts at ``start_epoch``, with the states of ``state`` restored."""
    loss_fn, stage_two_fn = build_losses(model.dataset_info.targets, hypers)
    freeze_layers(model, hypers["frozen_layers"])
    optimizer = build_optimizer(model, hypers)
    scheduler = build_scheduler(optimizer, hypers)
    restore_optimizer(optimizer, scheduler, state, model)
    logging.info(f"Initial learning rate: {base_learning_rate(optimizer)}")
    return Optimization(
        loss_fn=loss_fn,
        stage_two_fn=stage_two_fn,
        optimizer=optimizer,
        scheduler=scheduler,
        average=build_average(model, hypers, state),
        stage_two=resume_stage_two(optimizer, hypers, state, start_epoch),
    )
