"""Trainer of the ``experimental.mace`` architecture, on metatrain's machinery."""

import contextlib
import copy
import functools
import logging
import math
import time
from pathlib import Path
from typing import Any, Dict, List, Literal, Optional, Union, cast

import torch
from metatrain.utils.abc import TrainerInterface
from metatrain.utils.additive import get_remove_additive_transform
from metatrain.utils.data import (
    CombinedDataLoader,
    Dataset,
    build_train_dataloaders,
    build_val_dataloaders,
    get_num_workers,
    validate_num_workers,
)
from metatrain.utils.data.atomic_basis_helpers import (
    get_prepare_atomic_basis_targets_transform,
)
from metatrain.utils.evaluate_model import evaluate_model
from metatrain.utils.io import check_file_extension
from metatrain.utils.logging import ROOT_LOGGER, MetricLogger
from metatrain.utils.loss import LossAggregator, LossSpecification
from metatrain.utils.metrics import get_selected_metric
from metatrain.utils.neighbor_lists import (
    get_requested_neighbor_lists,
    get_system_with_neighbor_lists,
    get_system_with_neighbor_lists_transform,
)
from metatrain.utils.per_atom import average_by_num_atoms
from metatrain.utils.scaler import get_remove_scale_transform
from metatrain.utils.system_data import get_system_data_transform
from metatrain.utils.transfer import batch_to

from metatrain_mace import checkpoints
from metatrain_mace._version import __version__
from metatrain_mace.checkpoints import LATEST, atomic_save
from metatrain_mace.documentation import TrainerHypers
from metatrain_mace.finetune.strategies import apply_finetuning
from metatrain_mace.model import MetaMACE
from metatrain_mace.train import distributed
from metatrain_mace.train.baselines import fit_baselines
from metatrain_mace.train.datachecks import (
    SkipStructureLines,
    StructureNames,
    check_batch_limit,
    check_datasets,
)
from metatrain_mace.train.loading import prepare_data, unpack
from metatrain_mace.train.metrics import TargetUnitMetrics
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
from metatrain_mace.trunk.conditioning import (
    check_dataset_values,
    report_missing_inputs,
)


DatasetLike = Union[Dataset, torch.utils.data.Subset]
PROGRESS_SECONDS = 60.0
"""Within an epoch, a progress line is logged at most this often (seconds)."""


def average_num_neighbors(
    model: MetaMACE,
    datasets: List[DatasetLike],
    context: Optional[distributed.Context] = None,
) -> float:
    """Average number of neighbours within ``r_max`` over the training structures.

    In a distributed run each rank counts its share of the structures and the
    counts are summed, so every rank gets the same value."""
    context = distributed.Context() if context is None else context
    options = model.requested_neighbor_lists()[0]
    n_atoms = 0
    n_edges = 0
    total = sum(len(dataset) for dataset in datasets)
    done = 0
    for dataset in datasets:
        for index in range(context.rank, len(dataset), context.world_size):
            system = get_system_with_neighbor_lists(dataset[index]["system"], [options])
            n_atoms += len(system)
            n_edges += len(system.get_neighbor_list(options).samples)
            done += 1
            if done % 5000 == 0:
                logging.info(
                    f"Counted neighbours in {done * context.world_size}/{total} "
                    "structures"
                )
    n_atoms = int(distributed.all_reduce_sum(n_atoms, context))
    n_edges = int(distributed.all_reduce_sum(n_edges, context))
    if n_atoms == 0:
        raise ValueError("the training set is empty: no structure to train on")
    return max(n_edges / n_atoms, 1.0)


class Progress:
    """A log line every :data:`PROGRESS_SECONDS` within a long pass over the
    data, so that epochs of thousands of structures show that they advance."""

    def __init__(self, total: int, what: str) -> None:
        self.total = total
        self.what = what
        self.done = 0
        self.start = time.monotonic()
        self.last = self.start

    def step(self) -> None:
        self.done += 1
        now = time.monotonic()
        if now - self.last >= PROGRESS_SECONDS and self.done < self.total:
            self.last = now
            logging.info(
                f"  {self.what}: {self.done}/{self.total} batches "
                f"({now - self.start:.0f} s)"
            )


class Trainer(TrainerInterface[TrainerHypers]):
    """Trains :class:`metatrain_mace.model.MetaMACE` with metatrain's losses,
    baselines, data loading and logging, and a MACE-style optimizer."""

    __checkpoint_version__ = 3

    def __init__(self, hypers: TrainerHypers) -> None:
        super().__init__(hypers)
        self.optimizer_state_dict: Optional[Dict[str, Any]] = None
        self.scheduler_state_dict: Optional[Dict[str, Any]] = None
        self.epoch: Optional[int] = None
        self.best_epoch: Optional[int] = None
        self.best_metric: Optional[float] = None
        self.best_model_state_dict: Optional[Dict[str, Any]] = None
        self.best_optimizer_state_dict: Optional[Dict[str, Any]] = None
        self.ema_state: Optional[Dict[str, Any]] = None
        self.stage_two_scheduler_state_dict: Optional[Dict[str, Any]] = None

    def train(
        self,
        model: MetaMACE,
        dtype: torch.dtype,
        devices: List[torch.device],
        train_datasets: List[DatasetLike],
        val_datasets: List[DatasetLike],
        checkpoint_dir: str,
    ) -> None:
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
        device = context.device
        if context.enabled:
            logging.info(
                f"Training on {context.world_size} processes with dtype {dtype}"
            )
        else:
            logging.info(f"Training on device {device} with dtype {dtype}")

        if self.hypers["finetune"]["read_from"] is not None:
            model = apply_finetuning(model, self.hypers["finetune"])

        logging.info("Checking the training and validation data")
        sizes = check_datasets(
            {"training": train_datasets, "validation": val_datasets},
            model.dataset_info.targets,
            StructureNames(checkpoint_dir),
        )
        check_batch_limit(self.hypers["max_atoms_per_batch"], sizes)
        has_validation = sum(len(dataset) for dataset in val_datasets) > 0

        if model.from_file:
            pass  # the MACE file's own normalisation is part of the model
        elif model.hypers["avg_num_neighbors"] is None and self.epoch is None:
            if float(model.avg_num_neighbors) <= 0:
                logging.info("Computing the average number of neighbours")
                avg = average_num_neighbors(model, train_datasets, context)
                model.set_avg_num_neighbors(avg)
                logging.info(f"Average number of neighbours: {avg:.4f}")
        elif model.hypers["avg_num_neighbors"] is not None:
            model.set_avg_num_neighbors(model.hypers["avg_num_neighbors"])

        model.to(device=device, dtype=dtype)
        # baselines stay in float64: composition weights can be large
        for additive_model in model.additive_models:
            additive_model.to(dtype=torch.float64)
        model.scaler.to(dtype=torch.float64)

        # rank 0 fits the baselines (and writes their checkpoints); every rank then
        # takes rank 0's weights, baselines and scales
        if context.is_main:
            fit_baselines(model, self.hypers, train_datasets, checkpoint_dir)
        distributed.broadcast_state(model, context)

        # CPU float64 copies of the baselines, used by the collate functions
        model.additive_models[0].weights_to(device="cpu", dtype=torch.float64)
        additive_models = copy.deepcopy(
            model.additive_models.to(dtype=torch.float64, device="cpu")
        )
        model.additive_models.to(device)
        model.additive_models[0].weights_to(device=device, dtype=torch.float64)
        model.scaler.scales_to(device="cpu", dtype=torch.float64)
        scaler = copy.deepcopy(model.scaler.to(dtype=torch.float64, device="cpu"))
        model.scaler.to(device)
        model.scaler.scales_to(device=device, dtype=torch.float64)

        train_targets = model.dataset_info.targets
        if self.hypers["num_workers"] is None:
            num_workers = get_num_workers()
            logging.info(f"Using {num_workers} workers for data loading")
        else:
            num_workers = self.hypers["num_workers"]
            validate_num_workers(num_workers)
        # charge and spin (for models conditioned on them) go from extra_data onto
        # the systems, where the model reads them
        inputs = list(model.requested_inputs())
        if hasattr(model, "conditioning"):
            report_missing_inputs(model.conditioning, train_datasets + val_datasets)
            check_dataset_values(model.conditioning, train_datasets, "training")
            check_dataset_values(model.conditioning, val_datasets, "validation")

        start_epoch = 0 if self.epoch is None else self.epoch + 1
        if start_epoch >= self.hypers["num_epochs"]:
            # nothing to train (e.g. the zero-epoch export of a MACE file): no data
            # loaders, so that a few structures are enough for the baselines
            logging.info(
                f"No epoch to run (num_epochs is {self.hypers['num_epochs']}): the "
                "model keeps its weights"
            )
            return
        train_datasets, val_datasets, collate_fn = prepare_data(
            train_datasets,
            [distributed.shard(dataset, context) for dataset in val_datasets],
            transforms=[
                # atomic-basis targets (one block per atomic type on disk) in
                # metatrain's dense form, which the heads predict
                get_prepare_atomic_basis_targets_transform(
                    train_targets, model.dataset_info.extra_data
                )[0],
                get_system_with_neighbor_lists_transform(
                    get_requested_neighbor_lists(model)
                ),
                *([get_system_data_transform(inputs)] if inputs else []),
                get_remove_additive_transform(additive_models, train_targets),
                get_remove_scale_transform(scaler),
            ],
            target_keys=list(train_targets.keys()),
            num_workers=num_workers,
        )

        # metatrain logs one line per structure above max_atoms_per_batch;
        # check_batch_limit has said it in one
        skipped_lines = SkipStructureLines()
        logging.getLogger("metatrain.utils.data.samplers").addFilter(skipped_lines)
        train_loaders, epoch_samplers = build_train_dataloaders(
            train_datasets=train_datasets,
            train_distributed_samplers=distributed.training_samplers(
                train_datasets, context
            ),
            collate_fn_train=collate_fn,
            batch_size=self.hypers["batch_size"],
            max_atoms_per_batch=self.hypers["max_atoms_per_batch"],
            min_atoms_per_batch=0,
            num_workers=num_workers,
        )
        train_loader = CombinedDataLoader(train_loaders, shuffle=True)
        # validation needs no synchronisation between ranks: each rank evaluates
        # its own share (no structure twice) and the sums are reduced afterwards
        # metatrain's atom packing refuses empty sets (and shards)
        val_datasets = [dataset for dataset in val_datasets if len(dataset) > 0]
        val_loader = CombinedDataLoader(
            build_val_dataloaders(
                val_datasets=val_datasets,
                val_distributed_samplers=[None] * len(val_datasets),
                collate_fn_val=collate_fn,
                batch_size=self.hypers["batch_size"],
                max_atoms_per_batch=self.hypers["max_atoms_per_batch"],
                num_workers=num_workers,
            ),
            shuffle=False,
        )
        logging.getLogger("metatrain.utils.data.samplers").removeFilter(skipped_lines)
        if not has_validation:
            logging.warning(
                "There is no validation data ('validation_set' is empty): the best "
                "model is the one of the epoch with the lowest training loss"
            )

        loss_hypers = cast(Dict[str, LossSpecification], self.hypers["loss"])
        loss_fn = LossAggregator(targets=train_targets, config=loss_hypers)
        logging.info("Loss functions:")
        for name, info in loss_fn.metadata.items():
            logging.info(f"  {name}: {info}")
        stage_two_fn = None
        if self.hypers["stage_two_epoch"] is not None:
            stage_two_fn = LossAggregator(
                targets=train_targets,
                config=stage_two_loss(loss_hypers, self.hypers["stage_two_loss"]),
            )

        freeze_layers(model, self.hypers["frozen_layers"])
        optimizer = build_optimizer(model, self.hypers)
        scheduler = build_scheduler(optimizer, self.hypers)
        if self.optimizer_state_dict is not None and not model.has_new_targets:
            if same_layout(optimizer, self.optimizer_state_dict):
                optimizer.load_state_dict(self.optimizer_state_dict)
                if self.scheduler_state_dict is not None:
                    scheduler.load_state_dict(self.scheduler_state_dict)
            else:
                logging.warning(
                    "The optimizer state of the checkpoint has other parameter "
                    "groups (an older checkpoint, or changed 'frozen_layers', "
                    "'lr_factors' or fine-tuning): the optimizer and the learning "
                    "rate schedule start afresh"
                )
        logging.info(f"Initial learning rate: {base_learning_rate(optimizer)}")

        average: Optional[WeightAverage] = None
        if self.hypers["ema_decay"] is not None:
            average = WeightAverage(model, self.hypers["ema_decay"])
            if self.ema_state is not None and not average.load_state_dict(
                self.ema_state
            ):
                logging.warning(
                    "The weight average of the checkpoint describes other "
                    "parameters: it starts afresh from the current weights"
                )
            logging.info(
                f"Exponential moving average of the weights, decay "
                f"{self.hypers['ema_decay']}: validation, the best model, "
                "checkpoints and the export use the averaged weights"
            )
        swa_scheduler = None
        # a restart inside stage two (one at its first epoch switches in the loop)
        if in_stage_two(self.hypers, start_epoch - 1):
            log_stage_two(self.hypers, start_epoch)
            swa_scheduler = stage_two_scheduler(
                optimizer, self.hypers["stage_two_learning_rate"]
            )
            if self.stage_two_scheduler_state_dict is not None:
                swa_scheduler.load_state_dict(self.stage_two_scheduler_state_dict)

        # gradients are averaged over the ranks during the backward pass
        network = distributed.data_parallel(model, context)

        per_structure = list(self.hypers["per_structure_targets"])
        not_per_atom = ["positions_gradients", *per_structure]
        if self.best_metric is None:
            self.best_metric = math.inf
        epoch = start_epoch
        metric_logger: Optional[MetricLogger] = None
        train_metrics: Dict[str, Any] = {}
        needs_grad = any(info.gradients for info in train_targets.values())
        run_epoch = functools.partial(
            self._run_epoch,
            model,
            train_targets=train_targets,
            per_structure=per_structure,
            not_per_atom=not_per_atom,
            dtype=dtype,
            context=context,
            # the scaler's own list of targets that have per-property scales
            scale_properties=any(
                name in model.scaler.model.multi_property_target_names
                for name in train_targets
            ),
        )
        model.train()
        # a run killed during the first epoch restarts from here, not from the
        # baselines' checkpoints
        if context.is_main and self.epoch is None:
            self._keep_states(optimizer, scheduler, average, swa_scheduler)
            self.save_checkpoint(model, Path(checkpoint_dir) / LATEST)
        logging.info("Starting training")
        for epoch in range(start_epoch, self.hypers["num_epochs"]):
            if swa_scheduler is None and in_stage_two(self.hypers, epoch):
                # other loss weights: losses before and after do not compare
                log_stage_two(self.hypers, epoch)
                swa_scheduler = stage_two_scheduler(
                    optimizer, self.hypers["stage_two_learning_rate"]
                )
                self.best_metric = math.inf
            current_loss = loss_fn if swa_scheduler is None else stage_two_fn
            for sampler in epoch_samplers:
                if hasattr(sampler, "set_epoch"):
                    sampler.set_epoch(epoch)
            log_this_epoch = (
                epoch == start_epoch or epoch % self.hypers["log_interval"] == 0
            )
            train_loss, train_metrics_epoch = run_epoch(
                train_loader,
                loss_fn=current_loss,
                network=network,
                optimizer=optimizer,
                average=average,
                with_metrics=log_this_epoch,
            )
            if log_this_epoch:
                train_metrics = {"loss": train_loss, **train_metrics_epoch}

            # validation and the best model see the averaged weights (with EMA)
            averaged = (
                contextlib.nullcontext() if average is None else average.applied(model)
            )
            with averaged:
                if has_validation:
                    # the model stays in training mode: in evaluation mode it would
                    # add the baselines that the collate function removed
                    with torch.set_grad_enabled(needs_grad):
                        val_loss, val_metrics = run_epoch(
                            val_loader,
                            loss_fn=current_loss,
                            network=model,
                            optimizer=None,
                            average=None,
                            with_metrics=True,
                        )
                    val_metrics = {"loss": val_loss, **val_metrics}
                    logged = [train_metrics, val_metrics]
                else:
                    val_loss, val_metrics = train_loss, {"loss": train_loss}
                    logged = [train_metrics]

                # the metrics are reduced over all ranks: every rank takes the
                # same decisions (without validation data: the training loss)
                metric = (
                    get_selected_metric(val_metrics, self.hypers["best_model_metric"])
                    if has_validation
                    else train_loss
                )
                if metric < self.best_metric:
                    self.best_metric = metric
                    self.best_epoch = epoch
                    # e3nn weights, as every checkpoint (see get_checkpoint)
                    self.best_model_state_dict = copy.deepcopy(
                        model.e3nn_copy().state_dict()
                    )
                    self.best_optimizer_state_dict = copy.deepcopy(
                        optimizer.state_dict()
                    )
            if swa_scheduler is not None:
                swa_scheduler.step()  # the plateau scheduler stops in stage two
            else:
                step_scheduler(scheduler, val_loss)

            if metric_logger is None:
                metric_logger = MetricLogger(
                    log_obj=ROOT_LOGGER,
                    dataset_info=model.dataset_info,
                    initial_metrics=logged,
                    names=["training", "validation"][: len(logged)],
                )
            if log_this_epoch:
                metric_logger.log(
                    metrics=logged,
                    epoch=epoch,
                    rank=context.rank,
                    learning_rate=base_learning_rate(optimizer),
                )

            # a rolling checkpoint after every epoch (a kill loses at most one
            # epoch), and a kept one every checkpoint_interval epochs
            self.epoch = epoch
            self._keep_states(optimizer, scheduler, average, swa_scheduler)
            if context.is_main:
                self.save_checkpoint(model, Path(checkpoint_dir) / LATEST)
                if epoch % self.hypers["checkpoint_interval"] == 0:
                    self.save_checkpoint(
                        model, Path(checkpoint_dir) / f"model_{epoch}.ckpt"
                    )
            distributed.barrier(context)

        self.epoch = epoch if self.hypers["num_epochs"] > start_epoch else self.epoch
        self._keep_states(optimizer, scheduler, average, swa_scheduler)

    def _keep_states(
        self,
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        average: Optional[WeightAverage],
        swa_scheduler: Any,
    ) -> None:
        """The states that checkpoints save and restarts restore."""
        self.optimizer_state_dict = optimizer.state_dict()
        self.scheduler_state_dict = scheduler.state_dict()
        self.ema_state = None if average is None else average.state_dict()
        self.stage_two_scheduler_state_dict = (
            None if swa_scheduler is None else swa_scheduler.state_dict()
        )

    def _run_epoch(
        self,
        model: MetaMACE,
        loader: CombinedDataLoader,
        train_targets: Dict[str, Any],
        per_structure: List[str],
        not_per_atom: List[str],
        dtype: torch.dtype,
        context: distributed.Context,
        scale_properties: bool,
        loss_fn: LossAggregator,
        network: torch.nn.Module,
        optimizer: Optional[torch.optim.Optimizer],
        average: Optional[WeightAverage],
        with_metrics: bool,
    ) -> tuple:
        """One pass over ``loader``; trains when ``optimizer`` is given.

        ``network`` computes the predictions: the model itself, or its
        DistributedDataParallel wrapper for training steps of a distributed run.
        ``scale_properties``: whether a target has per-property scales (those with
        several properties or blocks; the scales of all others are 1). The loss
        and the metrics returned are sums over all ranks."""
        device = context.device
        metrics_in_target_units = TargetUnitMetrics(
            model.scaler,
            list(train_targets),
            separate_blocks=self.hypers["log_separate_blocks"],
            with_mae=self.hypers["log_mae"],
        )
        total_loss = 0.0
        progress = Progress(
            len(loader), "training" if optimizer is not None else "validation"
        )
        for batch in loader:
            if optimizer is not None:
                optimizer.zero_grad()
            systems, targets, extra_data = unpack(batch)
            systems, targets, extra_data = batch_to(
                systems, targets, extra_data, dtype=dtype, device=device
            )
            predictions = evaluate_model(
                network,
                systems,
                {name: train_targets[name] for name in targets},
                is_training=optimizer is not None,
            )
            predictions = average_by_num_atoms(predictions, systems, per_structure)
            targets = average_by_num_atoms(targets, systems, per_structure)
            if scale_properties:
                predictions = model.scaler.apply_scales(
                    systems,
                    predictions,
                    remove=False,
                    use_per_target_scales=False,
                    use_per_property_scales=True,
                )
            loss = loss_fn(predictions, targets, extra_data)
            if optimizer is not None:
                if context.enabled:
                    # DDP waits for a gradient of every parameter: heads of targets
                    # absent from this batch get zeros instead of none
                    loss = loss + 0.0 * sum(
                        p.sum() for p in model.parameters() if p.requires_grad
                    )
                loss.backward()
                torch.nn.utils.clip_grad_norm_(
                    model.parameters(), self.hypers["grad_clip_norm"]
                )
                optimizer.step()
                if average is not None:
                    average.update(model)
            total_loss += loss.item()
            if with_metrics:
                metrics_in_target_units.update(
                    systems, predictions, targets, extra_data
                )
            if context.is_main:
                progress.step()
        metrics: Dict[str, Any] = {}
        if with_metrics:
            metrics = metrics_in_target_units.finalize(
                not_per_atom, device, is_distributed=context.enabled
            )
        return distributed.all_reduce_sum(total_loss, context), metrics

    def save_checkpoint(self, model: MetaMACE, path: Union[str, Path]) -> None:
        checkpoint = model.get_checkpoint()
        checkpoint.update(
            {
                "trainer_ckpt_version": self.__checkpoint_version__,
                "train_hypers": self.hypers,
                "epoch": self.epoch,
                "optimizer_state_dict": self.optimizer_state_dict,
                "scheduler_state_dict": self.scheduler_state_dict,
                "best_epoch": self.best_epoch,
                "best_metric": self.best_metric,
                "best_model_state_dict": self.best_model_state_dict,
                "best_optimizer_state_dict": self.best_optimizer_state_dict,
                "ema_state": self.ema_state,
                "stage_two_scheduler_state_dict": self.stage_two_scheduler_state_dict,
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
        trainer = cls(hypers)
        if context == "restart":
            trainer.epoch = checkpoint["epoch"]
            trainer.optimizer_state_dict = checkpoint["optimizer_state_dict"]
            trainer.scheduler_state_dict = checkpoint["scheduler_state_dict"]
            trainer.best_epoch = checkpoint["best_epoch"]
            trainer.best_metric = checkpoint["best_metric"]
            trainer.best_model_state_dict = checkpoint["best_model_state_dict"]
            trainer.best_optimizer_state_dict = checkpoint["best_optimizer_state_dict"]
            trainer.ema_state = checkpoint["ema_state"]
            trainer.stage_two_scheduler_state_dict = checkpoint[
                "stage_two_scheduler_state_dict"
            ]
        return trainer

    @classmethod
    def upgrade_checkpoint(cls, checkpoint: Dict[str, Any]) -> Dict[str, Any]:
        return checkpoints.upgrade(
            checkpoint,
            "trainer",
            cls.__checkpoint_version__,
            checkpoints.TRAINER_UPDATES,
        )
