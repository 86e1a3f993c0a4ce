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
from typing import List

import ase.io
import metatensor.torch as mts
import numpy as np
import pytest
import torch
from metatomic.torch import ModelEvaluationOptions, ModelOutput, systems_to_torch
from metatrain.cli.train import train_model
from metatrain.utils.neighbor_lists import get_system_with_neighbor_lists
from omegaconf import OmegaConf

from helpers.datasets import ALLOY_TARGETS
from helpers.options import small_options


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
    message = refused(small_options(data), tmp_path)
    assert "target 'energy' of structure 3 of" in message
    assert str(data) in message and "non-finite value" in message


def test_infinite_force_is_named(frames, tmp_path: Path) -> None:
    frames[4].arrays["REF_forces"][1, 0] = np.inf
    data = write(frames, tmp_path / "data.xyz")
    message = refused(small_options(data), tmp_path)
    assert "forces of target 'energy' in structure 4 of" in message
    assert "infinite value" in message and "write NaN" in message


@pytest.mark.slow
def test_nan_force_means_missing(frames, tmp_path: Path) -> None:
    """A NaN force is a missing value: training runs and its loss is finite."""
    for atoms in frames:
        atoms.arrays["REF_forces"][0] = np.nan
    data = write(frames, tmp_path / "data.xyz")
    train(small_options(data, num_epochs=2), tmp_path)
    checkpoint = torch.load(tmp_path / "run.ckpt", weights_only=False)
    assert checkpoint["epoch"] == 1
    assert np.isfinite(checkpoint["best_metric"]) and checkpoint["best_metric"] > 0


def test_overlapping_atoms_are_named(frames, tmp_path: Path) -> None:
    frames[5].positions[2] = frames[5].positions[1] + [0.01, 0.0, 0.0]
    data = write(frames, tmp_path / "data.xyz")
    message = refused(small_options(data), tmp_path)
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
    message = refused(small_options(data, targets=targets), tmp_path)
    n = len(frames[6])
    assert f"per-atom target 'mtt::q' of structure 6 of '{data}'" in message
    assert f"has shape ({2 * n}, 1), expected ({n}, 1)" in message


@pytest.mark.slow
def test_degenerate_scale_falls_back_to_one(frames, tmp_path: Path, caplog) -> None:
    """Two structures of two elements: the composition baseline fits the energies
    exactly, and the fitted energy scale (~1e-16) would blow the loss up."""
    data = write(frames[:2], tmp_path / "data.xyz")
    caplog.set_level(logging.WARNING)
    run = train(small_options(data, validation=0, batch_size=1), tmp_path)
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
    message = refused(small_options(data, max_atoms_per_batch=1), tmp_path)
    assert "max_atoms_per_batch is 1, but every training structure is larger" in (
        message
    )
    assert f"at least {max(sizes)}" in message


@pytest.mark.slow
def test_some_structures_above_max_atoms(frames, tmp_path: Path, caplog) -> None:
    small = [a[:4] for a in frames[:8]]
    data = write(small + frames[:4], tmp_path / "data.xyz")
    caplog.set_level(logging.INFO)
    train(small_options(data, validation=0, max_atoms_per_batch=6), tmp_path)
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert "4 of 12 training structures have more than max_atoms_per_batch=6" in (
        "\n".join(lines)
    )
    assert not any("Skipping this structure" in line for line in lines)


@pytest.mark.slow
def test_validation_set_zero_selects_by_training_loss(
    frames, tmp_path: Path, caplog
) -> None:
    data = write(frames, tmp_path / "data.xyz")
    caplog.set_level(logging.INFO)
    train(small_options(data, validation=0, num_epochs=3), tmp_path)
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
    train(small_options(data, validation=0.5, num_epochs=0, batch_size=8), tmp_path)
    assert (tmp_path / "run.pt").is_file()


@pytest.mark.slow
def test_exported_model_names_the_system_with_a_nan_energy(
    frames, tmp_path: Path
) -> None:
    data = write(frames, tmp_path / "data.xyz")
    train(small_options(data), tmp_path)
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
    config = small_options(data)
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_long_epochs_log_their_progress(
    frames, tmp_path: Path, caplog, monkeypatch: pytest.MonkeyPatch
) -> None:
    import metatrain_mace.train.epoch

    monkeypatch.setattr(metatrain_mace.train.epoch, "PROGRESS_SECONDS", 0.0)
    data = write(frames, tmp_path / "data.xyz")
    caplog.set_level(logging.INFO)
    train(small_options(data, validation=0.25, batch_size=3), tmp_path)
    lines = [r.getMessage() for r in caplog.records]
    assert "  training: 1/3 batches" in "\n".join(lines)
    assert any(line.startswith("  training: 2/3 batches (") for line in lines)


def read_energy_section(path: Path, energy: dict):
    """The energy target of one file as metatrain reads it for training."""
    from metatrain.utils.data import read_targets
    from metatrain.utils.omegaconf import expand_dataset_config

    config = expand_dataset_config(
        OmegaConf.create(
            {
                "systems": {"read_from": str(path), "length_unit": "angstrom"},
                "targets": {"energy": energy},
            }
        )
    )[0]
    return read_targets(config["targets"])


def test_misspelt_gradient_keys_are_refused(frames, tmp_path: Path, caplog) -> None:
    """metatrain drops forces (stress) under a key no structure has, with only a
    warning: refused, naming the keys the file has."""
    path = write(frames, tmp_path / "data.xyz")
    energy = {**ALLOY_TARGETS["energy"], "forces": {"key": "REF_forcez"}}
    with pytest.raises(ValueError) as error:
        read_energy_section(path, energy)
    message = str(error.value)
    assert "no structure of" in message and "under the key 'REF_forcez'" in message
    assert "'REF_forces'" in message  # what the file has
    energy = {**ALLOY_TARGETS["energy"], "stress": {"key": "REF_stres"}}
    with pytest.raises(
        ValueError, match=r"stress under the key 'REF_stres'.*'REF_stress'"
    ):
        read_energy_section(path, energy)
    # the default names on energy-only data: metatrain's warning, no error
    energy = {"key": "REF_energy", "unit": "eV"}
    targets, infos = read_energy_section(path, energy)
    assert infos["energy"].gradients == []


def test_gradients_missing_in_some_structures_are_named(frames, tmp_path: Path) -> None:
    """One structure without forces made metatrain drop the forces of all: refused,
    naming the structure and the NaN convention; with NaN the others keep theirs."""
    del frames[3].arrays["REF_forces"]
    del frames[7].info["REF_stress"]
    path = write(frames, tmp_path / "data.xyz")
    with pytest.raises(
        ValueError,
        match=r"1 of the 12 structures of .* have no forces under the key "
        r"'REF_forces' \(structures 3, 0-based\).* Mark a missing value with NaN",
    ):
        read_energy_section(path, ALLOY_TARGETS["energy"])
    frames[3].arrays["REF_forces"] = np.full((len(frames[3]), 3), np.nan)
    path = write(frames, tmp_path / "data.xyz")
    with pytest.raises(ValueError, match=r"have no stress .*\(structures 7, 0-based\)"):
        read_energy_section(path, ALLOY_TARGETS["energy"])
    # a stress of the wrong shape: metatrain's reason, and the file named
    frames[7].info["REF_stress"] = np.full(4, np.nan)
    path = write(frames, tmp_path / "data.xyz")
    with pytest.raises(ValueError, match=r"cannot read the stress of .* 3 x 3 matrix"):
        read_energy_section(path, ALLOY_TARGETS["energy"])
    frames[7].info["REF_stress"] = np.full(frames[0].info["REF_stress"].shape, np.nan)
    path = write(frames, tmp_path / "data.xyz")
    targets, infos = read_energy_section(path, ALLOY_TARGETS["energy"])
    assert sorted(infos["energy"].gradients) == ["positions", "strain"]


def test_stress_of_structures_without_a_cell_is_named(frames, tmp_path: Path) -> None:
    molecule = frames[2].copy()
    molecule.cell = np.zeros((3, 3))
    molecule.pbc = False
    frames[2] = molecule
    path = write(frames, tmp_path / "data.xyz")
    with pytest.raises(
        ValueError, match=r"structures 2 of .* have a stress but no cell.*NaN stress"
    ):
        read_energy_section(path, ALLOY_TARGETS["energy"])


@pytest.mark.slow
def test_stage_two_that_never_starts_is_reported(
    frames, tmp_path: Path, caplog
) -> None:
    """'stage_two_epoch' at or beyond 'num_epochs': stage two, its loss and its
    learning rate would never be used; a warning at start-up names both."""
    data = write(frames[:4], tmp_path / "data.xyz")
    caplog.set_level(logging.INFO)
    train(small_options(data, num_epochs=1, stage_two_epoch=1), tmp_path)
    assert (
        "'stage_two_epoch' is 1, but the run has 'num_epochs' 1 (epochs 0 to 0): "
        "stage two never starts" in caplog.text
    )
    assert "Stage two from epoch" not in caplog.text
    # inside the run: no warning
    caplog.clear()
    train(small_options(data, num_epochs=2, stage_two_epoch=1), tmp_path, "second")
    assert "stage two never starts" not in caplog.text
    assert "Stage two from epoch 1" in caplog.text
