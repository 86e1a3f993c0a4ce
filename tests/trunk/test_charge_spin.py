"""MACE models conditioned on total charge and spin (MACE-OMOL style).

References: mace-torch's ``MACECalculator`` on the same file, reading
``atoms.info["charge"]`` and ``atoms.info["spin"]``; our side is the exported model
through metatomic's ASE calculator, which reads the same keys.
"""

import copy
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Optional

import ase
import ase.build
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

from helpers.cli import mtt, train_log
from helpers.mace_files import (
    CHARGE_SPIN_SPECS,
    CONTINUOUS_CHARGE_SPECS,
    save_mace_model,
)
from helpers.options import train_options, write_options
from helpers.parity import assert_parity, charged_structures, evaluate_charged
from metatrain_mace import MetaMACE, Trainer, export_mace_model


FILES = {
    "categorical-readout": dict(
        embedding_specs=CHARGE_SPIN_SPECS, use_embedding_readout=True
    ),
    "categorical": dict(embedding_specs=CHARGE_SPIN_SPECS),
    "continuous-charge-readout": dict(
        embedding_specs=CONTINUOUS_CHARGE_SPECS, use_embedding_readout=True
    ),
    "multihead-categorical-readout": dict(
        embedding_specs=CHARGE_SPIN_SPECS,
        use_embedding_readout=True,
        heads=["omol", "other"],
    ),
}


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict:
    directory = tmp_path_factory.mktemp("charge_spin")
    return {
        name: save_mace_model(directory / f"{name}.model", seed=10 + i, **kwargs)
        for i, (name, kwargs) in enumerate(FILES.items())
    }


@pytest.mark.parametrize(
    "name, head",
    [
        ("categorical-readout", None),
        ("categorical", None),
        ("continuous-charge-readout", None),
        ("multihead-categorical-readout", "other"),
    ],
)
def test_export_matches_mace_for_charge_and_spin_states(
    files: dict, tmp_path: Path, name: str, head
) -> None:
    output = tmp_path / "model.pt"
    export_mace_model(str(files[name]), str(output), head=head, dtype="float64")
    assert_parity(output, files[name], head)


def test_values_the_model_cannot_embed_are_refused(files: dict, tmp_path) -> None:
    output = tmp_path / "model.pt"
    export_mace_model(str(files["categorical"]), str(output), dtype="float64")
    calculator = MetatomicCalculator(str(output), device="cpu")
    molecule = charged_structures()[0]
    with pytest.raises(Exception, match=r"system 0: charge = 0.5 cannot be embedded"):
        evaluate_charged(calculator, molecule, 0.5, 1)
    with pytest.raises(Exception, match=r"integer values from -10 to 10"):
        evaluate_charged(calculator, molecule, 11, 1)
    with pytest.raises(Exception, match=r"spin_multiplicity = 12 cannot be embedded"):
        evaluate_charged(calculator, molecule, 0, 12)
    # 2S+1 >= 1: a multiplicity 0 is refused even where the table has a row for it
    with pytest.raises(Exception, match=r"system 0: spin_multiplicity = 0 is not a"):
        evaluate_charged(calculator, molecule, 0, 0)
    # the ASE calculator falls back to charge 0 and multiplicity 1 when atoms.info
    # has none, as MACE's calculator does
    bare = molecule.copy()
    bare.calc = calculator
    assert bare.get_potential_energy() == pytest.approx(
        evaluate_charged(calculator, molecule, 0, 1)[0], abs=1e-12
    )


@pytest.mark.slow
def test_export_command(files: dict, tmp_path: Path) -> None:
    command = str(Path(sys.executable).parent / "metatrain-mace")
    result = subprocess.run(
        [command, "export", str(files["categorical-readout"]), "-o", "omol.pt"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert_parity(tmp_path / "omol.pt", files["categorical-readout"])


# --- training with charge and spin from extra_data --------------------------------


def charged_molecules(path: Path, n: int = 24) -> Path:
    """Rattled small molecules with a total charge and multiplicity each; the
    energy is EMT's plus 1.5 eV per unit of charge and 0.4 eV per unpaired
    electron, so only a model that reads charge and spin can fit it."""
    rng = np.random.default_rng(0)
    names = ["H2O", "CH4", "CH3OH", "CO2", "C2H4", "HCOOH"]
    frames = []
    for i in range(n):
        atoms = ase.build.molecule(names[i % len(names)])
        atoms.positions += rng.normal(scale=0.05, size=atoms.positions.shape)
        charge = int(rng.integers(-1, 2))
        spin = 1 if charge == 0 else 2
        atoms.calc = EMT()
        energy = atoms.get_potential_energy() + 1.5 * charge + 0.4 * (spin - 1)
        forces = atoms.get_forces()
        atoms.calc = None
        atoms.info["REF_energy"] = energy
        atoms.info["charge"] = charge
        atoms.info["spin_multiplicity"] = spin
        atoms.arrays["REF_forces"] = forces
        frames.append(atoms)
    ase.io.write(path, frames, format="extxyz")
    return path


ENERGY = {"key": "REF_energy", "unit": "eV", "forces": {"key": "REF_forces"}}
EXTRA_DATA = {
    "charge": {"key": "charge"},
    "spin_multiplicity": {"key": "spin_multiplicity"},
}


def options(model: dict, num_epochs: int, **training) -> dict:
    training = {"batch_size": 4, "learning_rate": 0.01, **training}
    return train_options(
        "data.xyz",
        model,
        {"energy": ENERGY},
        extra_data=EXTRA_DATA,
        num_epochs=num_epochs,
        **training,
    )


@pytest.mark.slow
def test_mtt_train_eval_with_charge_and_spin(tmp_path: Path) -> None:
    """A model built from hypers with embedding_specs: 2 epochs of mtt train with
    charge and spin in extra_data, then mtt eval with the same extra_data."""
    charged_molecules(tmp_path / "data.xyz")
    model = {
        "r_max": 4.0,
        "hidden_irreps": "8x0e + 8x1o",
        "max_ell": 2,
        "correlation": 2,
        "embedding_specs": {
            "total_charge": {
                "type": "categorical",
                "emb_dim": 8,
                "num_classes": 5,
                "offset": 2,
            },
            "total_spin": {"type": "categorical", "emb_dim": 4, "num_classes": 4},
        },
        "use_embedding_readout": True,
    }
    write_options(tmp_path / "options.yaml", options(model, num_epochs=2))
    result = mtt("train", "options.yaml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    losses = [
        float(line.split("training loss: ")[1].split(" ")[0])
        for line in train_log(tmp_path).splitlines()
        if "training loss: " in line
    ]
    assert len(losses) == 2 and losses[1] < losses[0], losses

    write_options(
        tmp_path / "eval.yaml",
        {
            "systems": {"read_from": "data.xyz", "length_unit": "angstrom"},
            "targets": {"energy": ENERGY},
            "extra_data": EXTRA_DATA,
        },
    )
    result = mtt("eval", "model.pt", "eval.yaml", "-o", "pred.xyz", cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    predicted = ase.io.read(tmp_path / "pred.xyz", ":")
    frames = ase.io.read(tmp_path / "data.xyz", ":")
    # mtt eval passed each structure's charge and spin: same energies as ASE
    calculator = MetatomicCalculator(str(tmp_path / "model.pt"), device="cpu")
    for atoms, prediction in list(zip(frames, predicted, strict=True))[:4]:
        atoms.calc = calculator
        assert atoms.get_potential_energy() == pytest.approx(
            prediction.get_potential_energy(), abs=1e-8
        )
    # the charge changes the prediction
    atoms = frames[0].copy()
    atoms.calc = calculator
    atoms.info["charge"], atoms.info["spin_multiplicity"] = 0, 1
    neutral = atoms.get_potential_energy()
    atoms.info["charge"], atoms.info["spin_multiplicity"] = 1, 2
    assert abs(atoms.get_potential_energy() - neutral) > 1e-4


@pytest.mark.slow
def test_missing_charge_uses_defaults_with_a_log_line(tmp_path: Path, files) -> None:
    """Zero-epoch export of a conditioned file from data without charge/spin."""
    charged_molecules(tmp_path / "data.xyz", n=8)
    shutil.copy(files["categorical-readout"], tmp_path / "omol.model")
    content = options({"mace_model": "omol.model"}, num_epochs=0)
    del content["training_set"]["extra_data"]
    write_options(tmp_path / "options.yaml", content)
    result = mtt("train", "options.yaml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    log = train_log(tmp_path)
    assert "'charge' is not in the 'extra_data' of 2 of the 2" in log
    assert "MACE's default spin_multiplicity 1" in log
    assert_parity(tmp_path / "model.pt", tmp_path / "omol.model")


def test_mace_names_in_extra_data_are_refused(tmp_path: Path, files) -> None:
    """``extra_data`` under MACE's own names (``total_charge``, ``total_spin``)
    would train every structure as neutral singlet: refused, naming the key."""
    path = charged_molecules(tmp_path / "data.xyz", n=6)
    hypers = get_default_hypers("experimental.mace")
    training = {**hypers["training"], "num_epochs": 1, "batch_size": 2}
    for wrong, right in (
        ("total_charge", "charge"),
        ("total_spin", "spin_multiplicity"),
    ):
        extra = {**EXTRA_DATA, wrong: EXTRA_DATA[right]}
        del extra[right]
        dataset, info = dataset_with_charges(path, extra)
        model = MetaMACE(
            {**hypers["model"], "mace_model": str(files["categorical"])}, info
        )
        with pytest.raises(
            ValueError,
            match=rf"'extra_data' has '{wrong}', which this model does not read.*"
            rf"Rename '{wrong}:' to '{right}:'",
        ):
            Trainer(training).train(
                model,
                torch.float64,
                [torch.device("cpu")],
                [dataset],
                [dataset],
                str(tmp_path),
            )


def dataset_with_charges(path: Path, extra_data: Optional[dict] = None):
    config = expand_dataset_config(
        OmegaConf.create(
            {
                "systems": {"read_from": str(path), "length_unit": "angstrom"},
                "targets": {"energy": ENERGY},
                "extra_data": EXTRA_DATA if extra_data is None else extra_data,
            }
        )
    )[0]
    dataset, targets, extra = get_dataset(config)
    info = DatasetInfo(
        length_unit="angstrom",
        atomic_types=get_atomic_types(dataset),
        targets=targets,
        extra_data=extra,
    )
    return dataset, info


FINETUNE = {
    "full": {"method": "full", "read_from": "unused.ckpt"},
    "heads": {
        "method": "heads",
        "read_from": "unused.ckpt",
        "config": {"head_modules": ["heads"], "last_layer_modules": ["mace.readouts"]},
    },
    "lora": {
        "method": "lora",
        "read_from": "unused.ckpt",
        "config": {"rank": 2, "alpha": 4.0},
    },
}


@pytest.mark.slow
@pytest.mark.parametrize("method", ["full", "heads", "lora"])
def test_finetuning_a_conditioned_file(files, tmp_path: Path, method: str) -> None:
    """Fine-tuning (full, heads, LoRA) of a conditioned MACE file on data with
    charges: the loss drops and the result still depends on the charge."""
    path = charged_molecules(tmp_path / "data.xyz", n=12)
    dataset, info = dataset_with_charges(path)
    hypers = get_default_hypers("experimental.mace")
    model_hypers = {**hypers["model"], "mace_model": str(files["categorical-readout"])}
    model = MetaMACE(model_hypers, info)
    before = copy.deepcopy(model.state_dict())
    training = copy.deepcopy(hypers["training"])
    training.update(
        {
            "num_epochs": 3,
            "batch_size": 4,
            "num_workers": 0,
            "learning_rate": 0.01,
            "log_interval": 1,
            "finetune": FINETUNE[method],
            "loss": {
                "energy": {
                    "type": "mse",
                    "weight": 1.0,
                    "reduction": "mean",
                    "gradients": {
                        "positions": {"type": "mse", "weight": 1.0, "reduction": "mean"}
                    },
                }
            },
        }
    )
    trainer = Trainer(training)
    trainer.train(
        model, torch.float64, [torch.device("cpu")], [dataset], [dataset], str(tmp_path)
    )
    after = model.state_dict()
    moved = [
        name
        for name, value in before.items()
        if name in after
        and value.is_floating_point()
        and value.shape == after[name].shape
        and not torch.equal(value, after[name])
    ]
    if method == "full":
        assert any(n.startswith("trunk.mace.joint_embedding") for n in moved), moved
    if method == "heads":
        assert not any(n.startswith("trunk.mace.interactions") for n in moved), moved
        assert any(n.startswith("trunk.mace.readouts") for n in moved), moved
    if method == "lora":
        assert any(".lora_" in n for n in after if n not in before)
    assert trainer.state.best_metric < float("inf")

    exported = tmp_path / "model.pt"
    model.export().save(str(exported))
    calculator = MetatomicCalculator(str(exported), device="cpu")
    atoms = ase.build.molecule("H2O")
    neutral = evaluate_charged(calculator, atoms, 0, 1)[0]
    cation = evaluate_charged(calculator, atoms, 1, 2)[0]
    assert np.isfinite(neutral) and abs(cation - neutral) > 1e-4


def test_training_data_the_model_cannot_embed(files, tmp_path: Path) -> None:
    """A charge outside the file's table, or a spin multiplicity 0 (impossible:
    2S+1 >= 1), in the training data is refused before training, naming the
    dataset and the structure."""
    path = charged_molecules(tmp_path / "data.xyz", n=6)
    frames = ase.io.read(path, ":")
    hypers = get_default_hypers("experimental.mace")
    training = {**hypers["training"], "num_epochs": 1, "batch_size": 2}
    for key, structure, value, message in (
        ("charge", 4, 12, "charge = 12 cannot be embedded"),
        ("spin_multiplicity", 2, 0, "spin_multiplicity = 0 is not a spin"),
    ):
        changed = [atoms.copy() for atoms in frames]
        changed[structure].info[key] = value
        ase.io.write(path, changed, format="extxyz")
        dataset, info = dataset_with_charges(path)
        model = MetaMACE(
            {**hypers["model"], "mace_model": str(files["categorical"])}, info
        )
        with pytest.raises(
            ValueError, match=rf"training set 0, structure {structure}: {message}"
        ):
            Trainer(training).train(
                model,
                torch.float64,
                [torch.device("cpu")],
                [dataset],
                [dataset],
                str(tmp_path),
            )
