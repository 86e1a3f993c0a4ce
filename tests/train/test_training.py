"""Training on EMT energies, forces and stresses reduces the error against EMT."""

import copy

import ase.io
import numpy as np
import pytest
import torch
from ase.calculators.emt import EMT
from metatomic_ase import MetatomicCalculator
from metatrain.utils.architectures import get_default_hypers
from metatrain.utils.data import DatasetInfo, get_atomic_types, get_dataset
from metatrain.utils.omegaconf import expand_dataset_config
from omegaconf import OmegaConf

from helpers.datasets import ALLOY_TARGETS
from metatrain_mace import MetaMACE, Trainer


# whole training runs
pytestmark = pytest.mark.slow


NAME = "experimental.mace"


def load(path: str):
    dataset, targets, _ = get_dataset(
        expand_dataset_config(
            OmegaConf.create(
                {
                    "systems": {"read_from": path, "length_unit": "angstrom"},
                    "targets": ALLOY_TARGETS,
                }
            )
        )[0]
    )
    info = DatasetInfo(
        length_unit="angstrom", atomic_types=get_atomic_types(dataset), targets=targets
    )
    return dataset, info


def errors_against_emt(model: MetaMACE, frames: list, tmp_path) -> tuple:
    """RMSE of energy per atom, forces and stress of the exported model vs EMT."""
    exported = model.export()
    path = str(tmp_path / "model.pt")
    exported.save(path)
    calculator = MetatomicCalculator(path, extensions_directory=None)
    de, df, ds = [], [], []
    for atoms in frames:
        reference = atoms.copy()
        reference.calc = EMT()
        atoms = atoms.copy()
        atoms.calc = calculator
        de.append(
            (atoms.get_potential_energy() - reference.get_potential_energy())
            / len(atoms)
        )
        df.append(atoms.get_forces() - reference.get_forces())
        ds.append(atoms.get_stress() - reference.get_stress())
    rmse = lambda x: float(np.sqrt(np.mean(np.square(x))))  # noqa: E731
    return rmse(de), rmse(np.concatenate(df)), rmse(np.concatenate(ds))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_training_reduces_errors(alloy_path, tmp_path, dtype) -> None:
    torch.manual_seed(0)
    dataset, info = load(alloy_path)
    frames = ase.io.read(alloy_path, ":")[:8]
    model_hypers = get_default_hypers(NAME)["model"]
    model_hypers.update(
        {"r_max": 4.5, "hidden_irreps": "16x0e + 16x1o", "max_ell": 2, "correlation": 2}
    )
    training = copy.deepcopy(get_default_hypers(NAME)["training"])
    training.update(
        {
            "batch_size": 4,
            "num_workers": 0,
            "learning_rate": 0.01,
            "loss": {
                "energy": {
                    "type": "mse",
                    "weight": 1.0,
                    "reduction": "mean",
                    "gradients": {
                        "positions": {
                            "type": "mse",
                            "weight": 10.0,
                            "reduction": "mean",
                        },
                        "strain": {"type": "mse", "weight": 1.0, "reduction": "mean"},
                    },
                }
            },
        }
    )

    model = MetaMACE(model_hypers, info)
    Trainer({**training, "num_epochs": 0}).train(
        model, dtype, [torch.device("cpu")], [dataset], [dataset], str(tmp_path)
    )
    before = errors_against_emt(model, frames, tmp_path)

    trainer = Trainer({**training, "num_epochs": 12})
    trainer.train(
        model, dtype, [torch.device("cpu")], [dataset], [dataset], str(tmp_path)
    )
    model.load_state_dict(trainer.state.best_model_state_dict)
    after = errors_against_emt(model, frames, tmp_path)
    print(f"RMSE before (E/atom, F, stress): {before}; after: {after}")

    # measured (float64): E/atom 0.191 -> 0.097 eV, F 1.51 -> 0.090 eV/A,
    # stress 0.183 -> 0.012 eV/A^3 after 12 epochs
    assert after[1] < 0.2 * before[1], (before, after)  # forces
    assert after[2] < 0.3 * before[2], (before, after)  # stress
    assert after[0] < 0.75 * before[0], (before, after)  # energy per atom
