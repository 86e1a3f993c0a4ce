"""An ``AtomicDielectricMACE`` file through the stock ``mtt`` commands: zero-epoch
export, full training from the file, restart, heads fine-tuning, ``mtt eval``."""

from pathlib import Path

import ase
import ase.build
import ase.io
import numpy as np
import pytest
import torch
from mace.calculators import MACECalculator
from metatomic.torch import ModelOutput
from metatomic_ase import MetatomicCalculator
from metatrain.utils.io import model_from_checkpoint

from helpers.cli import mtt, train_log
from helpers.mace_files import build_dipole_model
from helpers.options import heads_finetune, train_options, write_options


# whole training runs
pytestmark = pytest.mark.slow

TARGETS = {
    "mtt::dipole": {
        "key": "REF_dipole",
        "quantity": "",
        "unit": "",
        "type": {"cartesian": {"rank": 1}},
        "sample_kind": "system",
        "num_subtargets": 1,
    },
    "mtt::polarizability": {
        "key": "REF_polarizability",
        "quantity": "",
        "unit": "",
        "type": {"cartesian": {"rank": 2}},
        "sample_kind": "system",
        "num_subtargets": 1,
    },
}


def molecules(count: int, seed: int) -> list:
    """Rattled small molecules of H, C and O."""
    generator = np.random.default_rng(seed)
    frames = []
    for i in range(count):
        atoms = ase.build.molecule(["CH3CHO", "H2O", "CH4", "CH3OH"][i % 4])
        atoms.positions += generator.normal(scale=0.08, size=atoms.positions.shape)
        frames.append(atoms)
    return frames


def run_ok(*args: str, cwd: Path) -> None:
    result = mtt(*args, cwd=cwd)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def predictions(path: Path, frames: list) -> dict:
    calculator = MetatomicCalculator(str(path), device="cpu")
    request = {name: ModelOutput(sample_kind="system") for name in TARGETS}
    values = {name: [] for name in TARGETS}
    for atoms in frames:
        result = calculator.run_model(atoms, request)
        for name in TARGETS:
            values[name].append(result[name].block().values.detach().numpy())
    return {
        name: np.concatenate(v).reshape(len(frames), -1) for name, v in values.items()
    }


def errors(path: Path, frames: list) -> dict:
    """RMSE of the exported model on ``frames`` (their reference values)."""
    predicted = predictions(path, frames)
    reference = {
        "mtt::dipole": np.array([a.info["REF_dipole"] for a in frames]),
        "mtt::polarizability": np.array(
            [a.info["REF_polarizability"] for a in frames]
        ).reshape(len(frames), 9),
    }
    return {
        name: float(np.sqrt(np.mean((predicted[name] - reference[name]) ** 2)))
        for name in TARGETS
    }


def test_dielectric_file_trains_and_exports(tmp_path: Path) -> None:
    # data: dipoles and polarizabilities of another random AtomicDielectricMACE
    teacher_path = tmp_path / "teacher.model"
    torch.save(build_dipole_model("dielectric", seed=5), teacher_path)
    teacher = MACECalculator(
        model_paths=str(teacher_path),
        model_type="DipolePolarizabilityMACE",
        device="cpu",
        default_dtype="float64",
    )
    frames = molecules(16, seed=0)
    for atoms in frames:
        teacher.calculate(atoms)
        atoms.info["REF_dipole"] = np.array(teacher.results["dipole"])
        atoms.info["REF_polarizability"] = np.array(teacher.results["polarizability"])
        atoms.calc = None
    ase.io.write(tmp_path / "data.xyz", frames, format="extxyz")
    torch.save(build_dipole_model("dielectric", seed=1), tmp_path / "file.model")

    def options(num_epochs: int) -> dict:
        return train_options(
            "data.xyz",
            {"mace_model": "file.model"},
            TARGETS,
            num_epochs=num_epochs,
            batch_size=4,
            learning_rate=0.01,
            checkpoint_interval=1,
        )

    # zero epochs: the file's own predictions
    write_options(tmp_path / "options.yaml", options(0))
    run_ok("train", "options.yaml", cwd=tmp_path)
    (tmp_path / "model.pt").rename(tmp_path / "zero.pt")
    (tmp_path / "model.ckpt").rename(tmp_path / "zero.ckpt")
    file_calculator = MACECalculator(
        model_paths=str(tmp_path / "file.model"),
        model_type="DipolePolarizabilityMACE",
        device="cpu",
        default_dtype="float64",
    )
    zero = predictions(tmp_path / "zero.pt", frames[:4])
    for i, atoms in enumerate(frames[:4]):
        file_calculator.calculate(atoms)
        np.testing.assert_allclose(
            zero["mtt::dipole"][i], file_calculator.results["dipole"], atol=1e-10
        )
        np.testing.assert_allclose(
            zero["mtt::polarizability"][i],
            file_calculator.results["polarizability"].reshape(-1),
            atol=1e-10,
        )

    # training from the file lowers the errors on the training data
    write_options(tmp_path / "options.yaml", options(6))
    run_ok("train", "options.yaml", cwd=tmp_path)
    before = errors(tmp_path / "zero.pt", frames)
    after = errors(tmp_path / "model.pt", frames)
    for name in TARGETS:
        assert after[name] < 0.7 * before[name], (name, before, after)

    # restart, and mtt eval of the exported model
    content = options(7)
    write_options(tmp_path / "options.yaml", content)
    run_ok("train", "options.yaml", "--restart", "model.ckpt", cwd=tmp_path)
    assert "Epoch:    6" in train_log(tmp_path)
    write_options(
        tmp_path / "eval.yaml",
        {
            "systems": {"read_from": "data.xyz", "length_unit": "angstrom"},
            "targets": TARGETS,
        },
    )
    run_ok("eval", "model.pt", "eval.yaml", "-o", "predictions.mts", cwd=tmp_path)

    # heads fine-tuning from the zero-epoch checkpoint: the readouts train, the
    # rest of MACE does not
    content = options(2)
    content["architecture"]["training"]["finetune"] = heads_finetune("zero.ckpt")
    write_options(tmp_path / "finetune.yaml", content)
    run_ok("train", "finetune.yaml", cwd=tmp_path)
    checkpoint = torch.load(tmp_path / "model.ckpt", weights_only=False)
    tuned = model_from_checkpoint(checkpoint, context="export").trunk.mace
    original = torch.load(tmp_path / "file.model", weights_only=False)
    trained = dict(tuned.named_parameters())
    moved = {
        name.split(".")[0]
        for name, p in original.named_parameters()
        if p.numel() > 0 and not torch.equal(p.to(trained[name].dtype), trained[name])
    }
    assert moved == {"readouts"}, moved
