"""MACE files through the stock ``mtt`` commands: zero-epoch export, fine-tuning,
self-contained checkpoints, the ``metatrain-mace export`` command and ASE dynamics."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import ase.io
import numpy as np
import pytest
import torch
from ase import units
from ase.md.velocitydistribution import MaxwellBoltzmannDistribution
from ase.md.verlet import VelocityVerlet
from metatomic_ase import MetatomicCalculator
from metatrain.utils.io import model_from_checkpoint

from helpers.cli import mtt, train_log
from helpers.mace_files import save_mace_model
from helpers.options import heads_finetune, train_options, write_options
from helpers.parity import assert_agree


# whole training runs
pytestmark = pytest.mark.slow


ENERGY = {
    "key": "REF_energy",
    "unit": "eV",
    "forces": {"key": "REF_forces"},
    "stress": {"key": "REF_stress"},
}
VOLUME = {"key": "volume", "unit": "angstrom^3", "forces": False, "stress": False}


def options(mace_model: str, num_epochs: int, **model) -> dict:
    return train_options(
        "alloy.xyz",
        {"mace_model": mace_model, "head_hidden_sizes": [8], **model},
        {"energy": ENERGY},
        num_epochs=num_epochs,
        batch_size=2,
        checkpoint_interval=1,
    )


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory, alloy_path: str) -> Path:
    """8 Cu-Au cells (with a per-structure volume target) and two MACE files, made
    once for the module."""
    folder = tmp_path_factory.mktemp("foundation-training")
    frames = ase.io.read(alloy_path, ":8")
    for atoms in frames:
        atoms.info["volume"] = atoms.get_volume() / len(atoms)
    ase.io.write(folder / "alloy.xyz", frames, format="extxyz")
    save_mace_model(folder / "multihead.model", heads=["pbe", "r2scan"], seed=3)
    save_mace_model(folder / "single.model", pair_repulsion=True, seed=4)
    return folder


@pytest.fixture
def workdir(tmp_path: Path, files: Path) -> Path:
    """A copy of the files, for one test to change."""
    shutil.copytree(files, tmp_path, dirs_exist_ok=True)
    return tmp_path


def run_ok(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    result = mtt(*args, cwd=cwd)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.mark.parametrize("head", ["pbe", "r2scan"])
def test_zero_epoch_export_matches_mace(workdir: Path, head: str) -> None:
    """The path users know: mtt train with num_epochs 0 writes model.pt."""
    write_options(
        workdir / "options.yaml",
        options("multihead.model", num_epochs=0, mace_head_name=head),
    )
    run_ok("train", "options.yaml", cwd=workdir)
    ours = MetatomicCalculator(str(workdir / "model.pt"), device="cpu")
    # H, C, O and Al were not in the Cu-Au dataset
    assert_agree(ours, workdir / "multihead.model", head, "float64")


def test_zero_epoch_export_float32(workdir: Path) -> None:
    content = options("single.model", num_epochs=0)
    content["base_precision"] = 32
    write_options(workdir / "options.yaml", content)
    run_ok("train", "options.yaml", cwd=workdir)
    ours = MetatomicCalculator(str(workdir / "model.pt"), device="cpu")
    assert_agree(ours, workdir / "single.model", None, "float32")


def test_finetune_from_file_with_new_target(workdir: Path) -> None:
    """Train the MACE readout target and a new head in one run; the checkpoint then
    works without the MACE file (export, eval, restart)."""
    content = options("single.model", num_epochs=2)
    content["training_set"]["targets"]["mtt::volume"] = VOLUME
    write_options(workdir / "options.yaml", content)
    run_ok("train", "options.yaml", cwd=workdir)
    assert "Loading the MACE model file" in train_log(workdir)

    checkpoint = torch.load(workdir / "model.ckpt", weights_only=False)
    model = model_from_checkpoint(checkpoint, context="export")
    original = torch.load(workdir / "single.model", weights_only=False)
    assert set(model.heads.keys()) == {"mtt::volume"}
    # full fine-tuning moved the trunk away from the file's weights
    trained = dict(model.trunk.mace.named_parameters())
    moved = [
        name
        for name, p in original.named_parameters()
        if p.numel() > 0 and not torch.equal(p.to(trained[name].dtype), trained[name])
    ]
    assert any(name.startswith("interactions") for name in moved)

    (workdir / "single.model").unlink()
    shutil.rmtree(workdir / "outputs")
    run_ok("export", "model.ckpt", "-o", "exported.pt", cwd=workdir)
    write_options(
        workdir / "eval.yaml",
        {
            "systems": {"read_from": "alloy.xyz", "length_unit": "angstrom"},
            "targets": {"energy": ENERGY, "mtt::volume": VOLUME},
        },
    )
    run_ok("eval", "exported.pt", "eval.yaml", "-o", "predictions.mts", cwd=workdir)
    content["architecture"]["training"]["num_epochs"] = 3
    write_options(workdir / "options.yaml", content)
    run_ok("train", "options.yaml", "--restart", "model.ckpt", cwd=workdir)
    log = train_log(workdir)
    assert "Loading the MACE model file" not in log
    assert "Epoch:    2" in log


def test_heads_finetune_keeps_the_trunk(workdir: Path) -> None:
    """Zero-epoch checkpoint of a file, then metatrain's 'heads' fine-tuning with a
    new target: the trunk stays as in the file, the head and readouts train."""
    write_options(workdir / "options.yaml", options("single.model", num_epochs=0))
    run_ok("train", "options.yaml", cwd=workdir)
    shutil.move(workdir / "model.ckpt", workdir / "foundation.ckpt")

    content = options("single.model", num_epochs=2)
    content["training_set"]["targets"]["mtt::volume"] = VOLUME
    content["architecture"]["training"]["finetune"] = heads_finetune("foundation.ckpt")
    write_options(workdir / "options.yaml", content)
    run_ok("train", "options.yaml", cwd=workdir)

    before = model_from_checkpoint(
        torch.load(workdir / "foundation.ckpt", weights_only=False), context="export"
    )
    after = model_from_checkpoint(
        torch.load(workdir / "model.ckpt", weights_only=False), context="export"
    )
    old = before.state_dict()
    for name, value in after.state_dict().items():
        if name.startswith(
            ("trunk.mace.interactions", "trunk.mace.products", "trunk.mace.node")
        ):
            assert torch.equal(value, old[name]), name
    readouts = [n for n in old if n.startswith("trunk.mace.readouts") and "weight" in n]
    assert any(not torch.equal(after.state_dict()[n], old[n]) for n in readouts)
    assert "mtt::volume" in after.heads


def test_export_command(workdir: Path) -> None:
    command = str(Path(sys.executable).parent / "metatrain-mace")
    result = subprocess.run(
        [command, "export", "multihead.model", "-o", "out/model.pt"]
        + ["--head", "r2scan", "--dtype", "float64"],
        cwd=workdir,
        capture_output=True,
        text=True,
        env={**os.environ},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    ours = MetatomicCalculator(str(workdir / "out" / "model.pt"), device="cpu")
    assert_agree(ours, workdir / "multihead.model", "r2scan", "float64")

    result = subprocess.run(
        [command, "export", "multihead.model"],
        cwd=workdir,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert "several heads ['pbe', 'r2scan']" in result.stderr


def test_nve_dynamics_conserves_energy(workdir: Path) -> None:
    """200 velocity-Verlet steps of a periodic Cu-Au cell, exported file model."""
    from metatrain_mace import export_mace_model

    export_mace_model(str(workdir / "single.model"), str(workdir / "md.pt"))
    atoms = ase.io.read(workdir / "alloy.xyz", "0")
    atoms.calc = MetatomicCalculator(str(workdir / "md.pt"), device="cpu")
    MaxwellBoltzmannDistribution(atoms, temperature_K=300, rng=np.random.default_rng(0))
    dynamics = VelocityVerlet(atoms, timestep=1.0 * units.fs)
    totals = []
    dynamics.attach(lambda: totals.append(atoms.get_total_energy()), interval=1)
    dynamics.run(200)
    drift = (max(totals) - min(totals)) / len(atoms)
    assert drift <= 1e-3, drift
    # the structure actually moved
    assert (
        np.abs(
            atoms.positions - ase.io.read(workdir / "alloy.xyz", "0").positions
        ).max()
        > 0.05
    )
