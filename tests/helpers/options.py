"""Option and hyper builders shared by the tests.

``train_options`` writes the options of an ``mtt train`` run (the content of an
``options.yaml``); ``alloy_options`` and ``small_options`` are the two small runs
on the Cu-Au data that several test files start; ``default_model`` and
``default_training`` are the package's default hypers with changes.
"""

import copy
from pathlib import Path
from typing import Any, List, Optional

import yaml
from metatrain.utils.architectures import get_default_hypers
from metatrain.utils.data import DatasetInfo
from metatrain.utils.data.target_info import get_energy_target_info
from omegaconf import OmegaConf

from helpers.datasets import ALLOY_TARGETS


NAME = "experimental.mace"

# a small MACE for whole training runs
SMALL_MODEL = {
    "r_max": 4.5,
    "hidden_irreps": "8x0e + 8x1o",
    "max_ell": 2,
    "correlation": 2,
    "radial_MLP": [16],
}

# a small MACE with every ordinary feature (l = 2, correlation 3, two interactions)
ORDINARY = {
    "r_max": 4.0,
    "num_radial_basis": 6,
    "max_ell": 2,
    "num_interactions": 2,
    "hidden_irreps": "8x0e + 8x1o + 8x2e",
    "correlation": 3,
    "MLP_irreps": "8x0e",
    "radial_MLP": [16],
    "head_hidden_sizes": [8],
}


# LoRA fine-tuning with a replay head: 'energy/new' starts as a copy of MACE's
# readout of 'energy'
LORA_WITH_REPLAY_HEAD = {
    "method": "lora",
    "read_from": "x",
    "config": {"rank": 2, "alpha": 4.0},
    "inherit_heads": {"energy/new": "energy"},
}


def heads_finetune(read_from: str) -> dict:
    """metatrain's 'heads' fine-tuning from ``read_from``: the heads and MACE's
    readouts train, the rest of MACE is frozen."""
    return {
        "method": "heads",
        "read_from": read_from,
        "config": {"head_modules": ["heads"], "last_layer_modules": ["mace.readouts"]},
    }


def default_model(**changes: Any) -> dict:
    """The default model hypers, with ``changes``."""
    return {**copy.deepcopy(get_default_hypers(NAME)["model"]), **changes}


def default_training(**changes: Any) -> dict:
    """The default training hypers, with ``changes``."""
    return {**copy.deepcopy(get_default_hypers(NAME)["training"]), **changes}


def file_model(path: Path, **changes: Any) -> dict:
    """Model hypers of a MACE file as the trunk."""
    return default_model(mace_model=str(path), **changes)


def energy_dataset_info(types: List[int], target: str = "energy") -> DatasetInfo:
    info = get_energy_target_info(
        target, OmegaConf.create({"quantity": "energy", "unit": "eV"})
    )
    return DatasetInfo(
        length_unit="angstrom", atomic_types=types, targets={target: info}
    )


def two_energies(types: List[int]) -> DatasetInfo:
    """``energy`` and ``energy/new``: a MACE head and a new one."""
    info = energy_dataset_info(types)
    new = energy_dataset_info(types, "energy/new")
    return DatasetInfo(
        length_unit="angstrom",
        atomic_types=types,
        targets={**info.targets, **new.targets},
    )


def train_options(
    data: Any,
    model: dict,
    targets: Optional[dict] = None,
    validation: Any = 0.25,
    extra_data: Optional[dict] = None,
    **training: Any,
) -> dict:
    """The options of an ``mtt train`` run: seed 0, float64, no test set, no
    data-loader workers; ``training`` are the training hypers."""
    training_set: dict = {
        "systems": {"read_from": str(data), "length_unit": "angstrom"},
        "targets": copy.deepcopy(targets or ALLOY_TARGETS),
    }
    if extra_data is not None:
        training_set["extra_data"] = extra_data
    return {
        "seed": 0,
        "base_precision": 64,
        "architecture": {
            "name": NAME,
            "model": copy.deepcopy(model),
            "training": {"num_workers": 0, **training},
        },
        "training_set": training_set,
        "validation_set": validation,
        "test_set": 0.0,
    }


def alloy_options(dataset: str, **training: Any) -> dict:
    """The small ``mtt`` run of the end-to-end tests: 2 epochs, a checkpoint each."""
    training = {"num_epochs": 2, "batch_size": 4, "checkpoint_interval": 1, **training}
    return train_options(dataset, SMALL_MODEL, validation=0.2, **training)


def small_options(
    data: Path, validation: Any = 0.25, targets: Optional[dict] = None, **training
) -> dict:
    """The in-process run of the bad-input tests: 1 epoch, batches of 2."""
    training = {"num_epochs": 1, "batch_size": 2, **training}
    return train_options(data, SMALL_MODEL, targets, validation, **training)


def write_options(path: Path, content: dict) -> None:
    path.write_text(yaml.safe_dump(content))
