"""Set-up and checks before training: the data, the model's normalisation by the
number of neighbours, its device and precision, the conditioning inputs and the
data-loading workers."""

import logging
from typing import Any, Dict, List, Optional

import torch
from metatrain.utils.data import get_num_workers, validate_num_workers
from metatrain.utils.neighbor_lists import get_system_with_neighbor_lists

from metatrain_mace.train import distributed
from metatrain_mace.train.datachecks import (
    StructureNames,
    check_batch_limit,
    check_datasets,
)
from metatrain_mace.trunk.conditioning import (
    check_dataset_values,
    report_missing_inputs,
)


def log_devices(context: distributed.Context, dtype: torch.dtype) -> None:
    if context.enabled:
        logging.info(f"Training on {context.world_size} processes with dtype {dtype}")
    else:
        logging.info(f"Training on device {context.device} with dtype {dtype}")


def check_data(
    model: Any,
    hypers: Dict[str, Any],
    train_datasets: List[Any],
    val_datasets: List[Any],
    checkpoint_dir: str,
) -> bool:
    """Check the targets and structures of the data and the batch limit; whether
    there is validation data."""
    logging.info("Checking the training and validation data")
    sizes = check_datasets(
        {"training": train_datasets, "validation": val_datasets},
        model.dataset_info.targets,
        StructureNames(checkpoint_dir),
    )
    check_batch_limit(hypers["max_atoms_per_batch"], sizes)
    return sum(len(dataset) for dataset in val_datasets) > 0


def average_num_neighbors(
    model: Any,
    datasets: List[Any],
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


def set_average_num_neighbors(
    model: Any,
    train_datasets: List[Any],
    context: distributed.Context,
    restarting: bool,
) -> None:
    """The ``avg_num_neighbors`` of the hypers, or counted in the training set
    (once: a restarted model keeps its own)."""
    if model.from_file:
        pass  # the MACE file's own normalisation is part of the model
    elif model.hypers["avg_num_neighbors"] is None and not restarting:
        if float(model.trunk.avg_num_neighbors) <= 0:
            logging.info("Computing the average number of neighbours")
            avg = average_num_neighbors(model, train_datasets, context)
            model.set_avg_num_neighbors(avg)
            logging.info(f"Average number of neighbours: {avg:.4f}")
    elif model.hypers["avg_num_neighbors"] is not None:
        model.set_avg_num_neighbors(model.hypers["avg_num_neighbors"])


def place_model(model: Any, device: torch.device, dtype: torch.dtype) -> None:
    """The model on the training device and dtype; its baselines in float64
    (composition weights can be large)."""
    model.to(device=device, dtype=dtype)
    for additive_model in model.additive_models:
        additive_model.to(dtype=torch.float64)
    model.scaler.to(dtype=torch.float64)


def data_workers(hypers: Dict[str, Any]) -> int:
    """The number of data-loading worker processes."""
    if hypers["num_workers"] is None:
        num_workers = get_num_workers()
        logging.info(f"Using {num_workers} workers for data loading")
    else:
        num_workers = hypers["num_workers"]
        validate_num_workers(num_workers)
    return num_workers


def check_conditioning(
    model: Any, train_datasets: List[Any], val_datasets: List[Any]
) -> None:
    """For models conditioned on charge and spin: report the datasets that do not
    give them, and refuse values the model cannot embed."""
    if hasattr(model.trunk, "conditioning"):
        report_missing_inputs(model.trunk.conditioning, train_datasets + val_datasets)
        check_dataset_values(model.trunk.conditioning, train_datasets, "training")
        check_dataset_values(model.trunk.conditioning, val_datasets, "validation")
