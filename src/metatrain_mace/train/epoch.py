"""One pass over the training or the validation data, and the metric lines of the
epochs."""

import logging
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch
from metatrain.utils.data import CombinedDataLoader
from metatrain.utils.evaluate_model import evaluate_model
from metatrain.utils.logging import ROOT_LOGGER, MetricLogger
from metatrain.utils.loss import LossAggregator
from metatrain.utils.per_atom import average_by_num_atoms
from metatrain.utils.transfer import batch_to

from metatrain_mace.train import distributed
from metatrain_mace.train.loading import unpack
from metatrain_mace.train.metrics import TargetUnitMetrics
from metatrain_mace.train.recipe import WeightAverage


PROGRESS_SECONDS = 60.0
"""Within an epoch, a progress line is logged at most this often (seconds)."""


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


@dataclass
class EpochRunner:
    """What stays the same over the epochs of a run: the model, its targets, the
    precision, the ranks and the logging and clipping hypers.

    :param model: the :class:`~metatrain_mace.model.MetaMACE` (not its
        DistributedDataParallel wrapper): its scaler and parameters.
    :param per_structure: targets averaged per structure, not per atom.
    :param scale_properties: whether a target has per-property scales (those with
        several properties or blocks; the scales of all others are 1).
    """

    model: Any
    targets: Dict[str, Any]
    per_structure: List[str]
    dtype: torch.dtype
    context: distributed.Context
    scale_properties: bool
    separate_blocks: bool
    with_mae: bool
    grad_clip_norm: float

    @classmethod
    def for_run(
        cls,
        model: Any,
        hypers: Dict[str, Any],
        dtype: torch.dtype,
        context: distributed.Context,
    ) -> "EpochRunner":
        targets = model.dataset_info.targets
        return cls(
            model=model,
            targets=targets,
            per_structure=list(hypers["per_structure_targets"]),
            dtype=dtype,
            context=context,
            # the scaler's own list of targets that have per-property scales
            scale_properties=any(
                name in model.scaler.model.multi_property_target_names
                for name in targets
            ),
            separate_blocks=hypers["log_separate_blocks"],
            with_mae=hypers["log_mae"],
            grad_clip_norm=hypers["grad_clip_norm"],
        )

    @property
    def needs_grad(self) -> bool:
        """Whether the predictions need gradients (forces, stress) also in
        validation."""
        return any(info.gradients for info in self.targets.values())

    def run(
        self,
        loader: CombinedDataLoader,
        loss_fn: LossAggregator,
        network: torch.nn.Module,
        optimizer: Optional[torch.optim.Optimizer],
        average: Optional[WeightAverage],
        with_metrics: bool,
    ) -> Tuple[float, Dict[str, Any]]:
        """One pass over ``loader``; trains when ``optimizer`` is given.

        ``network`` computes the predictions: the model itself, or its
        DistributedDataParallel wrapper for training steps of a distributed run.
        The loss and the metrics returned are sums over all ranks."""
        model = self.model
        context = self.context
        device = context.device
        metrics_in_target_units = TargetUnitMetrics(
            model.scaler,
            list(self.targets),
            separate_blocks=self.separate_blocks,
            with_mae=self.with_mae,
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
                systems, targets, extra_data, dtype=self.dtype, device=device
            )
            predictions = evaluate_model(
                network,
                systems,
                {name: self.targets[name] for name in targets},
                is_training=optimizer is not None,
            )
            predictions = average_by_num_atoms(predictions, systems, self.per_structure)
            targets = average_by_num_atoms(targets, systems, self.per_structure)
            if self.scale_properties:
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
                torch.nn.utils.clip_grad_norm_(model.parameters(), self.grad_clip_norm)
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
            not_per_atom = ["positions_gradients", *self.per_structure]
            metrics = metrics_in_target_units.finalize(
                not_per_atom, device, is_distributed=context.enabled
            )
        return distributed.all_reduce_sum(total_loss, context), metrics


class EpochLog:
    """metatrain's metric lines, for the first epoch of a run and every
    ``log_interval`` epochs."""

    def __init__(
        self, dataset_info: Any, log_interval: int, start_epoch: int, rank: int
    ) -> None:
        self.dataset_info = dataset_info
        self.log_interval = log_interval
        self.start_epoch = start_epoch
        self.rank = rank
        self.logger: Optional[MetricLogger] = None

    def due(self, epoch: int) -> bool:
        """Whether ``epoch`` is logged (and so computes training metrics)."""
        return epoch == self.start_epoch or epoch % self.log_interval == 0

    def log(
        self, epoch: int, metrics: List[Dict[str, Any]], learning_rate: float
    ) -> None:
        """``metrics``: training, and validation when there is validation data."""
        if self.logger is None:
            self.logger = MetricLogger(
                log_obj=ROOT_LOGGER,
                dataset_info=self.dataset_info,
                initial_metrics=metrics,
                names=["training", "validation"][: len(metrics)],
            )
        if self.due(epoch):
            self.logger.log(
                metrics=metrics,
                epoch=epoch,
                rank=self.rank,
                learning_rate=learning_rate,
            )
