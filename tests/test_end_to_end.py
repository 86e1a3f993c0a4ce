"""The stock ``mtt`` commands, run in subprocesses, use this package end to end."""

import re
import shutil
from pathlib import Path

import ase.io
import numpy as np
import pytest
import torch
from metatomic_ase import MetatomicCalculator
from metatrain.utils.io import model_from_checkpoint

import metatrain_mace
from helpers.cli import mtt, train_log
from helpers.options import alloy_options, write_options


# whole training runs
pytestmark = pytest.mark.slow


@pytest.fixture
def workdir(tmp_path: Path, alloy_path: str) -> Path:
    """16 Cu-Au cells: enough for every check here, in less time than all 40."""
    frames = ase.io.read(alloy_path, ":16")
    ase.io.write(tmp_path / "alloy.xyz", frames, format="extxyz")
    return tmp_path


def test_train_eval_restart(workdir: Path) -> None:
    write_options(
        workdir / "options.yaml",
        alloy_options(
            "alloy.xyz", lr_scheduler="ExponentialLR", lr_scheduler_gamma=0.5
        ),
    )
    result = mtt("train", "options.yaml", "-o", "model.pt", cwd=workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    # building, copying and compiling the e3nn/MACE modules printed about 200
    # TorchScript warning lines; what is left comes from metatrain's own
    # evaluation of the exported model
    output = result.stdout + result.stderr
    assert output.count("instance-level annotations") == 0
    assert output.count("`torch.jit.script` is deprecated") <= 2
    assert output.count("`torch.jit.trace_method` is deprecated") == 0
    log = train_log(workdir)
    assert f"Using metatrain-mace {metatrain_mace.__version__}" in log
    assert str(Path(metatrain_mace.__file__).parent) in log
    assert (workdir / "model.pt").exists() and (workdir / "model.ckpt").exists()

    checkpoint = torch.load(workdir / "model.ckpt", weights_only=False)
    assert (
        checkpoint["implementation"] == f"metatrain-mace {metatrain_mace.__version__}"
    )
    model = model_from_checkpoint(checkpoint, context="export")
    assert type(model) is metatrain_mace.MetaMACE
    assert checkpoint["epoch"] == 1

    # evaluation of the exported model with the stock command
    write_options(
        workdir / "eval.yaml",
        {
            "systems": {"read_from": "alloy.xyz", "length_unit": "angstrom"},
            "targets": alloy_options("alloy.xyz")["training_set"]["targets"],
        },
    )
    result = mtt("eval", "model.pt", "eval.yaml", "-o", "out.xyz", cwd=workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "energy RMSE" in result.stdout + result.stderr
    assert (workdir / "out.xyz").exists()

    # the stock export command on the checkpoint gives the model that training
    # exported: same energies, forces and stress through metatomic's ASE calculator
    result = mtt("export", "model.ckpt", "-o", "exported.pt", cwd=workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    trained = MetatomicCalculator(str(workdir / "model.pt"), extensions_directory=None)
    exported = MetatomicCalculator(
        str(workdir / "exported.pt"), extensions_directory=None
    )
    for atoms in ase.io.read(workdir / "alloy.xyz", ":3"):
        atoms.calc = trained
        energy, forces, stress = (
            atoms.get_potential_energy(),
            atoms.get_forces(),
            atoms.get_stress(),
        )
        atoms.calc = exported
        assert atoms.get_potential_energy() == pytest.approx(energy, abs=1e-10)
        np.testing.assert_allclose(atoms.get_forces(), forces, atol=1e-10, rtol=0)
        np.testing.assert_allclose(atoms.get_stress(), stress, atol=1e-10, rtol=0)
        assert np.abs(forces).max() > 1e-3  # a trained model, not zeros

    # predictions on structures without references: energy, forces and stress of
    # the trained model, as its ASE calculator gives them
    write_options(
        workdir / "predict.yaml",
        {"systems": {"read_from": "alloy.xyz", "length_unit": "angstrom"}},
    )
    result = mtt("eval", "model.pt", "predict.yaml", "-o", "new.xyz", cwd=workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    for atoms, predicted in zip(
        ase.io.read(workdir / "alloy.xyz", ":3"),
        ase.io.read(workdir / "new.xyz", ":3"),
        strict=True,
    ):
        atoms.calc = trained
        assert predicted.get_potential_energy() == pytest.approx(
            atoms.get_potential_energy(), abs=1e-10
        )
        np.testing.assert_allclose(
            predicted.get_forces(), atoms.get_forces(), atol=1e-8, rtol=0
        )
        np.testing.assert_allclose(
            predicted.get_stress(), atoms.get_stress(), atol=1e-10, rtol=0
        )

    # restart: continue at epoch 2 with the optimizer and scheduler state
    config = alloy_options(
        "alloy.xyz", lr_scheduler="ExponentialLR", lr_scheduler_gamma=0.5
    )
    config["architecture"]["training"]["num_epochs"] = 4
    write_options(workdir / "options.yaml", config)
    shutil.rmtree(workdir / "outputs")
    result = mtt(
        "train",
        "options.yaml",
        "--restart",
        "model.ckpt",
        "-o",
        "model2.pt",
        cwd=workdir,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    epochs = re.findall(
        r"Epoch:\s+(\d+) \| learning rate: ([0-9.e+-]+)", train_log(workdir)
    )
    assert [int(e) for e, _ in epochs] == [2, 3]
    # lr = 0.01 * 0.5 ** (epoch + 1): the scheduler state survived the restart
    assert float(epochs[0][1]) == pytest.approx(0.01 * 0.5**3)
    restarted = torch.load(workdir / "model2.ckpt", weights_only=False)
    assert restarted["epoch"] == 3
    assert restarted["optimizer_state_dict"]["state"]


def test_bad_hypers_fail_before_training(workdir: Path) -> None:
    config = alloy_options("alloy.xyz")
    config["architecture"]["model"]["hidden_irreps"] = "16x0e + 8x1o"
    write_options(workdir / "options.yaml", config)
    result = mtt("train", "options.yaml", cwd=workdir)
    assert result.returncode != 0
    assert "unequal multiplicities [8, 16]" in result.stdout + result.stderr
    assert "Calling trainer" not in train_log(workdir)


def test_disable_uses_metatrain_copy(workdir: Path) -> None:
    config = alloy_options("alloy.xyz")
    config["architecture"]["model"] = {"r_max": 4.5, "hidden_irreps": "8x0e + 8x1o"}
    config["architecture"]["training"] = {"num_epochs": 1, "batch_size": 4}
    write_options(workdir / "options.yaml", config)
    result = mtt("train", "options.yaml", cwd=workdir, METATRAIN_MACE_DISABLE="1")
    output = result.stdout + result.stderr + train_log(workdir)
    # metatrain's in-tree copy ran (it may fail with mace-torch 0.3.16), ours not
    assert "Using metatrain-mace" not in output
    assert "metatrain_mace" not in output
    assert "Running training for 'experimental.mace' architecture" in output
