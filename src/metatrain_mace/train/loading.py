"""Training data pipeline: per-structure preparation done once, light batching.

metatrain's default pipeline re-computes, for every batch of every epoch, the
neighbour lists, the composition baseline and the target scales, and then
serialises the batch into one buffer (so that worker processes can send it).
None of the three transforms changes during training (the baseline and the scaler
are fitted before the first epoch), so for datasets that already live in memory
:class:`PreparedDataset` applies them once per structure. When the data is loaded in
the training process itself, :class:`JoinBatch` also skips the serialisation.
Datasets read lazily from disk keep metatrain's per-batch transforms, so that
nothing is loaded into memory that was not there before.
"""

import logging
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Sequence, Tuple

import torch
from metatensor.learn.data import group_and_join
from metatensor.torch import TensorMap
from metatomic.torch import System
from metatrain.utils.additive import get_remove_additive_transform
from metatrain.utils.data import (
    CollateFn,
    CombinedDataLoader,
    Dataset,
    build_train_dataloaders,
    build_val_dataloaders,
    unpack_batch,
)
from metatrain.utils.data.atomic_basis_helpers import (
    get_prepare_atomic_basis_targets_transform,
)
from metatrain.utils.neighbor_lists import (
    get_requested_neighbor_lists,
    get_system_with_neighbor_lists_transform,
)
from metatrain.utils.scaler import get_remove_scale_transform
from metatrain.utils.system_data import get_system_data_transform

from metatrain_mace.train import distributed
from metatrain_mace.train.datachecks import SkipStructureLines


Transform = Callable[
    [List[System], Dict[str, TensorMap], Dict[str, TensorMap]],
    Tuple[List[System], Dict[str, TensorMap], Dict[str, TensorMap]],
]
Batch = Tuple[List[System], Dict[str, TensorMap], Dict[str, TensorMap]]


def is_in_memory(dataset: Any) -> bool:
    """Whether ``dataset`` (or the dataset under its ``Subset`` wrappers) holds its
    structures in memory (metatensor-learn's ``Dataset``, what metatrain builds
    from ASE-readable files)."""
    while isinstance(dataset, torch.utils.data.Subset):
        dataset = dataset.dataset
    return isinstance(dataset, Dataset)


class PreparedDataset(torch.utils.data.Dataset):
    """The samples of ``dataset`` with ``transforms`` applied once to each.

    :param dataset: an in-memory dataset (see :func:`is_in_memory`).
    :param transforms: metatrain batch transforms (neighbour lists, removal of the
        baseline and of the scales), applied here to one structure at a time.
    :param target_keys: names of the sample fields that are targets; the other
        fields (except ``system``) are extra data.
    :param name: what to call the dataset in the progress log.
    """

    def __init__(
        self,
        dataset: Any,
        transforms: Sequence[Transform],
        target_keys: Sequence[str],
        name: str,
    ) -> None:
        self.samples: List[Any] = []
        target_keys = set(target_keys)
        step = max(len(dataset) // 10, 1000)
        for index in range(len(dataset)):
            sample = dataset[index]
            fields = sample._asdict()
            systems = [fields["system"]]
            targets = {k: v for k, v in fields.items() if k in target_keys}
            extra = {
                k: v for k, v in fields.items() if k != "system" and k not in targets
            }
            for transform in transforms:
                systems, targets, extra = transform(systems, targets, extra)
            fields.update(targets)
            fields.update(extra)
            fields["system"] = systems[0]
            self.samples.append(sample._make(fields.values()))
            if (index + 1) % step == 0:
                logging.info(f"Prepared {index + 1}/{len(dataset)} {name} structures")

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Any:
        return self.samples[index]

    def get_num_atoms(self, index: int) -> int:
        """Atoms in structure ``index`` (used by metatrain's atom-count sampler)."""
        return len(self.samples[index].system)


class JoinBatch:
    """Collate function for data loaded in the training process: joins the samples
    of a batch and returns ``(systems, targets, extra_data)`` directly."""

    def __init__(self, target_keys: Sequence[str]) -> None:
        self.target_keys = set(target_keys)

    def __call__(self, batch: List[Any]) -> Batch:
        # joining maps with the same blocks is twice as fast as taking their union;
        # only some targets (atomic-basis ones) have different blocks per sample
        tensor_fields = [
            i
            for i, value in enumerate(batch[0])
            if isinstance(value, torch.ScriptObject)
            and value._type().name() == "TensorMap"
        ]
        same_keys = all(
            sample[i].keys == batch[0][i].keys
            for sample in batch[1:]
            for i in tensor_fields
        )
        join_kwargs = {"different_keys": "error" if same_keys else "union"}
        data = group_and_join(batch, join_kwargs=join_kwargs)._asdict()
        systems = list(data.pop("system"))
        targets = {k: v for k, v in data.items() if k in self.target_keys}
        extra = {k: v for k, v in data.items() if k not in self.target_keys}
        return systems, targets, extra


def unpack(batch: Any) -> Batch:
    """``(systems, targets, extra_data)`` of a batch from either collate function."""
    if len(batch) == 3:
        return batch
    return unpack_batch(batch)


def prepare_data(
    train_datasets: List[Any],
    val_datasets: List[Any],
    transforms: List[Transform],
    target_keys: List[str],
    num_workers: int,
) -> Tuple[List[Any], List[Any], Callable]:
    """Datasets and collate function for training, see the module docstring."""
    if not all(is_in_memory(d) for d in train_datasets + val_datasets):
        logging.info("Datasets are read from disk: preparing structures per batch")
        return (
            train_datasets,
            val_datasets,
            CollateFn(target_keys=target_keys, callables=transforms),
        )

    logging.info("Preparing the structures (neighbour lists, baselines, scales)")
    train = [
        PreparedDataset(d, transforms, target_keys, "training") for d in train_datasets
    ]
    val = [
        PreparedDataset(d, transforms, target_keys, "validation") for d in val_datasets
    ]
    if num_workers == 0:
        return train, val, JoinBatch(target_keys)
    return train, val, CollateFn(target_keys=target_keys, callables=[])


@dataclass
class Loaders:
    """The data loaders of a run.

    ``samplers``: the training samplers, told the epoch (distributed runs)."""

    train: CombinedDataLoader
    validation: CombinedDataLoader
    samplers: List[Any]

    def set_epoch(self, epoch: int) -> None:
        for sampler in self.samplers:
            if hasattr(sampler, "set_epoch"):
                sampler.set_epoch(epoch)


def build_loaders(
    model: Any,
    hypers: Dict[str, Any],
    train_datasets: List[Any],
    val_datasets: List[Any],
    baselines: Tuple[Any, Any],
    num_workers: int,
    context: distributed.Context,
) -> Loaders:
    """Training and validation loaders over the prepared structures (neighbour
    lists, charge and spin for conditioned models, and the targets without the
    baselines ``(additive_models, scaler)`` and in metatrain's dense form for
    atomic-basis targets)."""
    additive_models, scaler = baselines
    train_targets = model.dataset_info.targets
    # charge and spin (for models conditioned on them) go from extra_data onto
    # the systems, where the model reads them
    inputs = list(model.requested_inputs())
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
        batch_size=hypers["batch_size"],
        max_atoms_per_batch=hypers["max_atoms_per_batch"],
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
            batch_size=hypers["batch_size"],
            max_atoms_per_batch=hypers["max_atoms_per_batch"],
            num_workers=num_workers,
        ),
        shuffle=False,
    )
    logging.getLogger("metatrain.utils.data.samplers").removeFilter(skipped_lines)
    return Loaders(train_loader, val_loader, list(epoch_samplers))
