"""Bad data and bad options end in clear errors (or are handled) before training.

Each case reproduces what a new user ran into: the assertion is on the message
(structure index, file, value, what to do) or on the corrected behaviour. Training
runs in-process through metatrain's own ``train_model`` (the function ``mtt
train`` calls), to keep the interpreter start-up out of every case.
"""

import copy
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, List

import ase.io
import metatensor.torch as mts
import numpy as np
import pytest
import torch
from metatomic.torch import ModelEvaluationOptions, ModelOutput, systems_to_torch
from metatrain.cli.train import train_model
from metatrain.utils.neighbor_lists import get_system_with_neighbor_lists
from omegaconf import OmegaConf

from datasets import ALLOY_TARGETS


MODEL = {
    "r_max": 4.5,
    "hidden_irreps": "8x0e + 8x1o",
    "max_ell": 2,
    "correlation": 2,
    "radial_MLP": [16],
}


def options(data: Path, validation: Any = 0.25, targets=None, **training) -> dict:
    return {
        "seed": 0,
        "base_precision": 64,
        "architecture": {
            "name": "experimental.mace",
            "model": dict(MODEL),
            "training": {
                "num_epochs": 1,
                "batch_size": 2,
                "num_workers": 0,
                **training,
            },
        },
        "training_set": {
            "systems": {"read_from": str(data), "length_unit": "angstrom"},
            "targets": targets or ALLOY_TARGETS,
        },
        "validation_set": validation,
        "test_set": 0.0,
    }


def train(config: dict, workdir: Path, name: str = "run") -> Path:
    """``mtt train`` in this process; returns the output folder."""
    run = workdir / "outputs" / name
    run.mkdir(parents=True)
    train_model(
        OmegaConf.create(copy.deepcopy(config)),
        output=str(workdir / f"{name}.pt"),
        checkpoint_dir=str(run),
    )
    return run


def refused(config: dict, workdir: Path) -> str:
    """The message of the error that stops training (metatrain's wrapper shortens
    it, so the original exception's)."""
    with pytest.raises(Exception) as error:
        train(config, workdir)
    cause: BaseException = error.value
    while cause.__cause__ is not None:
        cause = cause.__cause__
    return str(cause)


@pytest.fixture
def frames(alloy_path: str) -> List[ase.Atoms]:
    return ase.io.read(alloy_path, ":12")


def write(frames: List[ase.Atoms], path: Path) -> Path:
    ase.io.write(path, frames, format="extxyz")
    return path


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_non_finite_energy_is_named(frames, tmp_path: Path, value: float) -> None:
    frames[3].info["REF_energy"] = value
    data = write(frames, tmp_path / "data.xyz")
    message = refused(options(data), tmp_path)
    assert "target 'energy' of structure 3 of" in message
    assert str(data) in message and "non-finite value" in message


def test_infinite_force_is_named(frames, tmp_path: Path) -> None:
    frames[4].arrays["REF_forces"][1, 0] = np.inf
    data = write(frames, tmp_path / "data.xyz")
    message = refused(options(data), tmp_path)
    assert "forces of target 'energy' in structure 4 of" in message
    assert "infinite value" in message and "write NaN" in message


def test_nan_force_means_missing(frames, tmp_path: Path) -> None:
    """A NaN force is a missing value: training runs and its loss is finite."""
    for atoms in frames:
        atoms.arrays["REF_forces"][0] = np.nan
    data = write(frames, tmp_path / "data.xyz")
    train(options(data, num_epochs=2), tmp_path)
    checkpoint = torch.load(tmp_path / "run.ckpt", weights_only=False)
    assert checkpoint["epoch"] == 1
    assert np.isfinite(checkpoint["best_metric"]) and checkpoint["best_metric"] > 0


def test_overlapping_atoms_are_named(frames, tmp_path: Path) -> None:
    frames[5].positions[2] = frames[5].positions[1] + [0.01, 0.0, 0.0]
    data = write(frames, tmp_path / "data.xyz")
    message = refused(options(data), tmp_path)
    assert "atoms 1 and 2 of structure 5 of" in message
    assert "0.01 Å apart (closer than 0.1 Å)" in message


def test_per_atom_target_of_wrong_shape(frames, tmp_path: Path) -> None:
    for atoms in frames:
        atoms.arrays["REF_q"] = np.zeros((len(atoms), 1))
    frames[6].arrays["REF_q"] = np.zeros((len(frames[6]), 2))
    data = write(frames, tmp_path / "data.xyz")
    targets = {
        **ALLOY_TARGETS,
        "mtt::q": {"key": "REF_q", "sample_kind": "atom", "type": "scalar"},
    }
    message = refused(options(data, targets=targets), tmp_path)
    n = len(frames[6])
    assert f"per-atom target 'mtt::q' of structure 6 of '{data}'" in message
    assert f"has shape ({2 * n}, 1), expected ({n}, 1)" in message


def test_degenerate_scale_falls_back_to_one(frames, tmp_path: Path, caplog) -> None:
    """Two structures of two elements: the composition baseline fits the energies
    exactly, and the fitted energy scale (~1e-16) would blow the loss up."""
    data = write(frames[:2], tmp_path / "data.xyz")
    caplog.set_level(logging.WARNING)
    run = train(options(data, validation=0, batch_size=1), tmp_path)
    assert "The fitted scale of target 'energy' is" in caplog.text
    assert "set to 1 instead" in caplog.text
    checkpoint = torch.load(run / "model_latest.ckpt", weights_only=False)
    scale = mts.load_buffer(
        checkpoint["model_state_dict"]["scaler.energy_scaler_buffer"]
    )
    assert scale.block().values.flatten().tolist() == [1.0]
    # the training loss selects the best epoch here: with the 1e-16 scale it was
    # 4e29
    assert checkpoint["best_metric"] < 1e6


def test_max_atoms_per_batch_below_every_structure(frames, tmp_path: Path) -> None:
    data = write(frames, tmp_path / "data.xyz")
    sizes = [len(a) for a in frames]
    message = refused(options(data, max_atoms_per_batch=1), tmp_path)
    assert "max_atoms_per_batch is 1, but every training structure is larger" in (
        message
    )
    assert f"at least {max(sizes)}" in message


def test_some_structures_above_max_atoms(frames, tmp_path: Path, caplog) -> None:
    small = [a[:4] for a in frames[:8]]
    data = write(small + frames[:4], tmp_path / "data.xyz")
    caplog.set_level(logging.INFO)
    train(options(data, validation=0, max_atoms_per_batch=6), tmp_path)
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert "4 of 12 training structures have more than max_atoms_per_batch=6" in (
        "\n".join(lines)
    )
    assert not any("Skipping this structure" in line for line in lines)


def test_validation_set_zero_selects_by_training_loss(
    frames, tmp_path: Path, caplog
) -> None:
    data = write(frames, tmp_path / "data.xyz")
    caplog.set_level(logging.INFO)
    train(options(data, validation=0, num_epochs=3), tmp_path)
    assert "best model is the one of the epoch with the lowest training loss" in (
        caplog.text
    )
    checkpoint = torch.load(tmp_path / "run.ckpt", weights_only=False)
    assert checkpoint["best_epoch"] > 0  # before: always epoch 0
    assert checkpoint["best_metric"] > 0


def test_zero_epoch_run_with_fewer_structures_than_a_batch(
    frames, tmp_path: Path
) -> None:
    data = write(frames[:4], tmp_path / "data.xyz")
    train(options(data, validation=0.5, num_epochs=0, batch_size=8), tmp_path)
    assert (tmp_path / "run.pt").is_file()


def test_exported_model_names_the_system_with_a_nan_energy(
    frames, tmp_path: Path
) -> None:
    data = write(frames, tmp_path / "data.xyz")
    train(options(data), tmp_path)
    model = torch.jit.load(str(tmp_path / "run.pt"))
    overlapping = frames[1].copy()
    overlapping.positions[3] = overlapping.positions[0]
    systems = systems_to_torch([frames[0], overlapping], dtype=torch.float64)
    systems = [
        get_system_with_neighbor_lists(s, model.requested_neighbor_lists())
        for s in systems
    ]
    evaluation = ModelEvaluationOptions(
        length_unit="angstrom", outputs={"energy": ModelOutput(per_atom=False)}
    )
    with pytest.raises(Exception, match="'energy' of system 1 is not finite"):
        model(systems, evaluation, check_consistency=False)
    # the good structure alone is fine
    energy = model(systems[:1], evaluation, check_consistency=False)["energy"]
    assert torch.isfinite(energy.block().values).all()


def test_mace_head_target_typo_is_refused(frames, tmp_path: Path) -> None:
    data = write(frames, tmp_path / "data.xyz")
    config = options(data)
    config["architecture"]["model"]["mace_head_target"] = "energies"
    message = refused(config, tmp_path)
    assert "'mace_head_target' is 'energies', which is not one of the targets" in (
        message
    )
    assert "(['energy'])" in message


def test_model_without_energy_needs_no_head_target() -> None:
    from metatrain.utils.data import DatasetInfo
    from metatrain.utils.data.target_info import get_generic_target_info

    from metatrain_mace.heads.targets import check_head_target

    info = get_generic_target_info(
        "mtt::q",
        {
            "quantity": "",
            "unit": "",
            "type": "scalar",
            "num_subtargets": 1,
            "sample_kind": "atom",
            "description": "",
        },
    )
    dataset_info = DatasetInfo(
        length_unit="angstrom", atomic_types=[29], targets={"mtt::q": info}
    )
    check_head_target("energy", dataset_info)  # the default may name no target
    with pytest.raises(ValueError, match="'mtt::Q', which is not one of the"):
        check_head_target("mtt::Q", dataset_info)


def test_e3nn_unpickling_advice_of_the_troubleshooting_page() -> None:
    """Plain ``from e3nn import o3`` fails under torch's safe ``torch.load``; the
    documented fix (``import metatrain_mace.mace_import`` first) works and keeps
    the safe mode on."""
    environment = {
        k: v for k, v in os.environ.items() if k != "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"
    }

    def python(code: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            env=environment,
        )

    plain = python("import metatrain_mace; from e3nn import o3")
    assert plain.returncode != 0 and "Weights only load failed" in plain.stderr
    advised = python(
        "import os, metatrain_mace.mace_import\n"
        "from e3nn import o3\n"
        "print(o3.Irreps('1x1o'))\n"
        "assert 'TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD' not in os.environ\n"
    )
    assert advised.returncode == 0, advised.stderr[-2000:]
    assert "1x1o" in advised.stdout


def test_long_epochs_log_their_progress(
    frames, tmp_path: Path, caplog, monkeypatch: pytest.MonkeyPatch
) -> None:
    import metatrain_mace.trainer

    monkeypatch.setattr(metatrain_mace.trainer, "PROGRESS_SECONDS", 0.0)
    data = write(frames, tmp_path / "data.xyz")
    caplog.set_level(logging.INFO)
    train(options(data, validation=0.25, batch_size=3), tmp_path)
    lines = [r.getMessage() for r in caplog.records]
    assert "  training: 1/3 batches" in "\n".join(lines)
    assert any(line.startswith("  training: 2/3 batches (") for line in lines)
