"""One training run with targets of every kind; LLPR uncertainties on top of it.

The dataset (``helpers/multitarget.py``) holds EMT energies with forces and
stresses, five scalars per structure and per atom, a per-structure dipole, a
per-atom vector and a three-block spherical target. Every target's error against
its reference, measured with the exported model, must drop during training.
metatrain's LLPR wrapper then computes finite, positive uncertainties from our
last-layer features.
"""

import copy

import ase.io
import metatensor.torch as mts
import numpy as np
import pytest
import torch
from metatomic.torch import ModelOutput
from metatomic_ase import MetatomicCalculator
from metatrain.llpr import LLPRUncertaintyModel
from metatrain.utils.architectures import get_default_hypers
from metatrain.utils.data import DatasetInfo, get_atomic_types, get_dataset
from metatrain.utils.neighbor_lists import get_system_with_neighbor_lists
from metatrain.utils.omegaconf import expand_dataset_config
from omegaconf import OmegaConf

from helpers.multitarget import write_dataset
from helpers.options import default_model
from metatrain_mace import MetaMACE, Trainer


# whole training runs
pytestmark = pytest.mark.slow


NAME = "experimental.mace"
HYPERS = {
    "r_max": 3.5,
    "num_radial_basis": 6,
    "max_ell": 2,
    "num_interactions": 2,
    "hidden_irreps": "8x0e + 8x1o + 8x2e",
    "correlation": 2,
    "MLP_irreps": "8x0e",
    "radial_MLP": [16],
    "head_hidden_sizes": [16],
}
EPOCHS = 60


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The dataset, its info, the frames and the spherical reference."""
    directory = tmp_path_factory.mktemp("multitarget")
    written = write_dataset(directory, n_structures=16)
    config = expand_dataset_config(
        OmegaConf.create(
            {
                "systems": {"read_from": written["xyz"], "length_unit": "angstrom"},
                "targets": written["targets"],
            }
        )
    )[0]
    dataset, targets, _ = get_dataset(config)
    info = DatasetInfo(
        length_unit="angstrom", atomic_types=get_atomic_types(dataset), targets=targets
    )
    frames = ase.io.read(written["xyz"], ":")
    spherical = mts.load(str(directory / "spherical.mts"))
    return dataset, info, frames, spherical, directory


def rmse(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x))))


def errors(model: MetaMACE, frames: list, spherical) -> dict:
    """RMSE of every target (and forces) of the exported model on ``frames``."""
    calculator = MetatomicCalculator(model.export(), extensions_directory=None)
    kinds = {
        name: info.sample_kind for name, info in model.dataset_info.targets.items()
    }
    outputs = {name: ModelOutput(sample_kind=kind) for name, kind in kinds.items()}
    predicted = calculator.run_model(frames, outputs)

    def values(name: str) -> np.ndarray:
        return predicted[name].block().values.detach().numpy()

    result = {
        "energy": rmse(values("energy")[:, 0] - [a.info["REF_energy"] for a in frames]),
        "mtt::scalars": rmse(
            values("mtt::scalars") - np.stack([a.info["REF_scalars"] for a in frames])
        ),
        "mtt::atom_scalars": rmse(
            values("mtt::atom_scalars")
            - np.concatenate([a.arrays["REF_atom_scalars"] for a in frames])
        ),
        "mtt::dipole": rmse(
            values("mtt::dipole")[:, :, 0]
            - np.stack([a.info["REF_dipole"] for a in frames])
        ),
        "mtt::displacement": rmse(
            values("mtt::displacement")[:, :, 0]
            - np.concatenate([a.arrays["REF_displacement"] for a in frames])
        ),
        "mtt::spherical": rmse(
            np.concatenate(
                [
                    (
                        predicted["mtt::spherical"].block(key).values.detach()
                        - spherical.block(key).values
                    ).reshape(-1)
                    for key in spherical.keys
                ]
            )
        ),
    }
    forces = []
    for atoms in frames:
        atoms = atoms.copy()
        atoms.calc = calculator
        forces.append(atoms.get_forces() - atoms.arrays["REF_forces"])
    result["forces"] = rmse(np.concatenate(forces))
    return result


@pytest.fixture(scope="module")
def trained(data):
    """The model before (composition and scales fitted) and after training."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    dataset, info, frames, spherical, directory = data
    torch.manual_seed(0)
    hypers = default_model(**HYPERS)
    training = copy.deepcopy(get_default_hypers(NAME)["training"])
    mse = {"type": "mse", "weight": 1.0, "reduction": "mean"}
    loss = {name: {**mse, "gradients": {}} for name in info.targets}
    loss["energy"]["gradients"] = {
        "positions": mse,
        "strain": mse,
    }
    training.update(
        {"batch_size": 4, "num_workers": 0, "learning_rate": 0.02, "loss": loss}
    )
    model = MetaMACE(hypers, info)
    Trainer({**training, "num_epochs": 0}).train(
        model,
        torch.float64,
        [torch.device("cpu")],
        [dataset],
        [dataset],
        str(directory),
    )
    before = errors(model, frames, spherical)
    trainer = Trainer({**training, "num_epochs": EPOCHS})
    trainer.train(
        model,
        torch.float64,
        [torch.device("cpu")],
        [dataset],
        [dataset],
        str(directory),
    )
    model.load_state_dict(trainer.state.best_model_state_dict)
    after = errors(model, frames, spherical)
    torch.set_num_threads(previous)
    return model, before, after


def test_every_target_kind_trains(trained) -> None:
    model, before, after = trained
    for name in before:
        print(f"{name}: RMSE {before[name]:.4f} -> {after[name]:.4f}")
    for name in before:
        assert after[name] < 0.8 * before[name], (name, before[name], after[name])


def test_llpr_uncertainties_for_every_target(trained, data) -> None:
    """metatrain's LLPR wrapper works on this model, for all targets at once.

    The covariance is accumulated for every target; uncertainties are requested for
    every single-block target (LLPR's forward cannot handle several blocks).
    """
    model, _, _ = trained
    dataset, info, frames, _, _ = data
    llpr = LLPRUncertaintyModel(get_default_hypers("llpr")["model"], info)
    llpr.set_wrapped_model(model.to(torch.float64).eval())
    llpr.compute_covariance([dataset], batch_size=4, is_distributed=False)
    llpr.compute_cholesky_decomposition(regularizer=1e-8)
    systems = [
        get_system_with_neighbor_lists(
            dataset[i]["system"], model.requested_neighbor_lists()
        )
        for i in range(4)
    ]
    outputs = {}
    for name, target in info.targets.items():
        if len(target.layout) > 1:
            # metatrain's LLPR builds uncertainties of single-block targets only
            # (it reads ``.block()``); its covariance above did include this target
            continue
        uncertainty = "mtt::aux::" + name.replace("mtt::", "") + "_uncertainty"
        if name == "energy":
            uncertainty = "energy_uncertainty"
        outputs[name] = ModelOutput(sample_kind=target.sample_kind)
        outputs[uncertainty] = ModelOutput(sample_kind=target.sample_kind)
    result = llpr(systems, outputs)
    for name in outputs:
        if name.endswith("_uncertainty"):
            values = result[name].block().values
            print(name, tuple(values.shape), float(values.min()), float(values.max()))
            assert torch.isfinite(values).all(), name
            assert (values > 0).all(), name
