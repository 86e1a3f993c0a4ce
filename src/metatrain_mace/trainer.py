"""Trainer of the ``experimental.mace`` architecture, on metatrain's machinery.

:meth:`Trainer.train` runs named steps from :mod:`metatrain_mace.train`: set-up
and checks (:mod:`~metatrain_mace.train.setup`), baselines
(:mod:`~metatrain_mace.train.baselines`), data loaders
(:mod:`~metatrain_mace.train.loading`), losses, optimizer, schedules, EMA and
stage two (:mod:`~metatrain_mace.train.updates`), then the epochs
(:mod:`~metatrain_mace.train.epoch`): a training pass, validation and the choice
of the best model, the learning-rate schedule, metric lines and checkpoints. What
checkpoints save and restarts restore is one
:class:`~metatrain_mace.train.state.TrainingState`.
"""

import contextlib
import logging
from pathlib import Path
from typing import Any, Dict, List, Literal, Optional, Tuple, Union

import torch
from metatrain.utils.abc import TrainerInterface
from metatrain.utils.data import Dataset
from metatrain.utils.io import check_file_extension
from metatrain.utils.metrics import get_selected_metric

from metatrain_mace import checkpoints
from metatrain_mace._version import __version__
from metatrain_mace.checkpoints import LATEST, atomic_save
from metatrain_mace.documentation import TrainerHypers
from metatrain_mace.finetune.strategies import apply_finetuning
from metatrain_mace.model import MetaMACE
from metatrain_mace.train import distributed
from metatrain_mace.train.baselines import set_up_baselines
from metatrain_mace.train.defaults import restart_hypers
from metatrain_mace.train.epoch import EpochLog, EpochRunner
from metatrain_mace.train.loading import Loaders, build_loaders
from metatrain_mace.train.recipe import check_stage_two
from metatrain_mace.train.setup import (
    check_conditioning,
    check_data,
    data_workers,
    log_devices,
    place_model,
    set_average_num_neighbors,
)
from metatrain_mace.train.state import TrainingState
from metatrain_mace.train.updates import Optimization, set_up_optimization


DatasetLike = Union[Dataset, torch.utils.data.Subset]


class Trainer(TrainerInterface[TrainerHypers]):
    """Trains :class:`metatrain_mace.model.MetaMACE` with metatrain's losses,
    baselines, data loading and logging, and a MACE-style optimizer."""

    __checkpoint_version__ = 4

    def __init__(self, hypers: TrainerHypers) -> None:
        super().__init__(hypers)
        self.state = TrainingState()

    @property
    def epoch(self) -> Optional[int]:
        """The last epoch trained (``None`` before the first one)."""
        return self.state.epoch

    def train(
        self,
        model: MetaMACE,
        dtype: torch.dtype,
        devices: List[torch.device],
        train_datasets: List[DatasetLike],
        val_datasets: List[DatasetLike],
        checkpoint_dir: str,
    ) -> None:
        self.state.check_backend(model)
        if sum(len(dataset) for dataset in train_datasets) == 0:
            raise ValueError(
                "the training set is empty: no structure to train on. Check "
                "'training_set' in the options file."
            )
        logging.info(
            f"Using metatrain-mace {__version__} ({Path(__file__).parent}) "
            "for the experimental.mace architecture"
        )
        context = distributed.setup(
            self.hypers.get("distributed"), self.hypers["distributed_port"], devices[0]
        )
        try:
            self._train(
                model,
                dtype,
                context,
                train_datasets,
                val_datasets,
                checkpoint_dir,
            )
        finally:
            # every rank leaves the group, also on an error, so that no rank waits
            # forever for the others
            distributed.teardown(context)

    def _train(
        self,
        model: MetaMACE,
        dtype: torch.dtype,
        context: distributed.Context,
        train_datasets: List[DatasetLike],
        val_datasets: List[DatasetLike],
        checkpoint_dir: str,
    ) -> None:
        hypers: Dict[str, Any] = self.hypers  # type: ignore[assignment]
        log_devices(context, dtype)
        distributed.check_shares(train_datasets, context)
        check_stage_two(hypers)
        if context.is_main:
            # what a run killed during a checkpoint write left behind
            checkpoints.remove_stale_temporaries_of_runs(checkpoint_dir)
        if hypers["finetune"]["read_from"] is not None:
            model = apply_finetuning(model, hypers["finetune"])
        has_validation = check_data(
            model, hypers, train_datasets, val_datasets, checkpoint_dir
        )
        set_average_num_neighbors(
            model, train_datasets, context, restarting=self.state.epoch is not None
        )
        place_model(model, context.device, dtype)
        baselines = set_up_baselines(
            model, hypers, train_datasets, checkpoint_dir, context
        )
        num_workers = data_workers(hypers)
        check_conditioning(model, train_datasets, val_datasets)

        start_epoch = self.state.next_epoch
        if start_epoch >= hypers["num_epochs"]:
            # nothing to train (e.g. the zero-epoch export of a MACE file): no data
            # loaders, so that a few structures are enough for the baselines
            logging.info(
                f"No epoch to run (num_epochs is {hypers['num_epochs']}): the "
                "model keeps its weights"
            )
            return
        loaders = build_loaders(
            model,
            hypers,
            train_datasets,
            val_datasets,
            baselines,
            num_workers,
            context,
        )
        if not has_validation:
            logging.warning(
                "There is no validation data ('validation_set' is empty): the best "
                "model is the one of the epoch with the lowest training loss"
            )
        optimization = set_up_optimization(model, hypers, self.state, start_epoch)
        self._run_epochs(
            model,
            EpochRunner.for_run(model, hypers, dtype, context),
            loaders,
            optimization,
            has_validation,
            start_epoch,
            checkpoint_dir,
        )

    def _run_epochs(
        self,
        model: MetaMACE,
        runner: EpochRunner,
        loaders: Loaders,
        optimization: Optimization,
        has_validation: bool,
        start_epoch: int,
        checkpoint_dir: str,
    ) -> None:
        """The epochs from ``start_epoch`` to ``num_epochs``: a training pass,
        validation and the best model, the schedules, metric lines and
        checkpoints."""
        context = runner.context
        # gradients are averaged over the ranks during the backward pass
        network = distributed.data_parallel(model, context)
        self.state.start()
        log = EpochLog(
            model.dataset_info, self.hypers["log_interval"], start_epoch, context.rank
        )
        train_metrics: Dict[str, Any] = {}
        model.train()
        # a run killed during the first epoch restarts from here, not from the
        # baselines' checkpoints
        if context.is_main and self.state.epoch is None:
            optimization.keep(self.state)
            self.save_checkpoint(model, Path(checkpoint_dir) / LATEST)
        logging.info("Starting training")
        for epoch in range(start_epoch, self.hypers["num_epochs"]):
            if optimization.enter_stage_two(self.hypers, epoch):
                # other loss weights: losses before and after do not compare
                self.state.best_metric = float("inf")
            loaders.set_epoch(epoch)
            train_loss, metrics = runner.run(
                loaders.train,
                loss_fn=optimization.loss,
                network=network,
                optimizer=optimization.optimizer,
                average=optimization.average,
                with_metrics=log.due(epoch),
            )
            if log.due(epoch):
                train_metrics = {"loss": train_loss, **metrics}
            val_loss, logged = self._validate(
                model,
                runner,
                loaders,
                optimization,
                has_validation,
                epoch,
                train_loss,
                train_metrics,
            )
            optimization.step_schedules(val_loss)
            log.log(epoch, logged, optimization.learning_rate)
            self.state.epoch = epoch
            optimization.keep(self.state)
            self._save_checkpoints(model, epoch, checkpoint_dir, context)

    def _validate(
        self,
        model: MetaMACE,
        runner: EpochRunner,
        loaders: Loaders,
        optimization: Optimization,
        has_validation: bool,
        epoch: int,
        train_loss: float,
        train_metrics: Dict[str, Any],
    ) -> Tuple[float, List[Dict[str, Any]]]:
        """Validation of the epoch and the choice of the best model (without
        validation data: by the training loss); the loss that the learning-rate
        schedule follows, and the metrics to log."""
        average = optimization.average
        # validation and the best model see the averaged weights (with EMA)
        averaged = (
            contextlib.nullcontext() if average is None else average.applied(model)
        )
        with averaged:
            if has_validation:
                # the model stays in training mode: in evaluation mode it would
                # add the baselines that the collate function removed
                with torch.set_grad_enabled(runner.needs_grad):
                    val_loss, val_metrics = runner.run(
                        loaders.validation,
                        loss_fn=optimization.loss,
                        network=model,
                        optimizer=None,
                        average=None,
                        with_metrics=True,
                    )
                val_metrics = {"loss": val_loss, **val_metrics}
                logged = [train_metrics, val_metrics]
                metric = get_selected_metric(
                    val_metrics, self.hypers["best_model_metric"]
                )
            else:
                val_loss = metric = train_loss
                logged = [train_metrics]
            # the metrics are reduced over all ranks: every rank takes the same
            # decisions
            self.state.record_if_best(metric, epoch, model, optimization.optimizer)
        return val_loss, logged

    def _save_checkpoints(
        self,
        model: MetaMACE,
        epoch: int,
        checkpoint_dir: str,
        context: distributed.Context,
    ) -> None:
        """A rolling checkpoint after every epoch (a kill loses at most one
        epoch), and a kept one every ``checkpoint_interval`` epochs."""
        if context.is_main:
            self.save_checkpoint(model, Path(checkpoint_dir) / LATEST)
            if epoch % self.hypers["checkpoint_interval"] == 0:
                self.save_checkpoint(
                    model, Path(checkpoint_dir) / f"model_{epoch}.ckpt"
                )
        distributed.barrier(context)

    def save_checkpoint(self, model: MetaMACE, path: Union[str, Path]) -> None:
        checkpoint = model.get_checkpoint()
        checkpoint.update(
            {
                "trainer_ckpt_version": self.__checkpoint_version__,
                "train_hypers": self.hypers,
                **self.state.to_checkpoint(),
            }
        )
        atomic_save(checkpoint, check_file_extension(path, ".ckpt"))

    @classmethod
    def load_checkpoint(
        cls,
        checkpoint: Dict[str, Any],
        hypers: TrainerHypers,
        context: Literal["restart", "finetune"],
    ) -> "Trainer":
        if context != "restart":
            return cls(hypers)
        state = TrainingState.from_checkpoint(checkpoint)
        recorded = checkpoint.get("train_hypers")
        trainer = cls(
            restart_hypers(  # type: ignore[arg-type]
                dict(hypers), recorded, state.hyper_defaults
            )
        )
        state.select_by(
            trainer.hypers.get("best_model_metric"),
            None if recorded is None else recorded.get("best_model_metric"),
        )
        trainer.state = state
        return trainer

    @classmethod
    def upgrade_checkpoint(cls, checkpoint: Dict[str, Any]) -> Dict[str, Any]:
        return checkpoints.upgrade(
            checkpoint,
            "trainer",
            cls.__checkpoint_version__,
            checkpoints.TRAINER_UPDATES,
        )
