"""Crashes during checkpoint writes, and restarts from files that cannot continue a
run: a kill loses at most one epoch, and every bad restart file is named with the
checkpoint to use instead."""

import copy
import os
import shutil
import subprocess
import sys
from pathlib import Path

import ase.io
import pytest
import torch
import yaml
from metatrain.cli.train import train_model
from omegaconf import OmegaConf

from helpers.options import small_options
from metatrain_mace.checkpoints import atomic_save, check_restart_file


# kills the process (SIGKILL: no clean-up, no finally) in the middle of the third
# write of the rolling checkpoint, i.e. the one after epoch 1
KILLING_MTT = """
import os, signal, sys, torch
original = torch.save
writes = []
def save(obj, f, *args, **kwargs):
    if "model_latest" in str(getattr(f, "name", f)):
        writes.append(1)
        if len(writes) == 3:
            f.write(b"PK\\x03\\x04 half a checkpoint")
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
    return original(obj, f, *args, **kwargs)
torch.save = save
from metatrain.__main__ import main
sys.argv = ["mtt", "train", "options.yaml"]
main()
"""


def mtt_env() -> dict:
    environment = {**os.environ}
    environment.pop("METATRAIN_MACE_DISABLE", None)
    return environment


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, alloy_path: str) -> Path:
    """The output folder of a finished two-epoch run with all its checkpoints."""
    workdir = tmp_path_factory.mktemp("run")
    # 12 of the 40 cells: the checks are on the files, not on the fit
    frames = ase.io.read(alloy_path, ":12")
    ase.io.write(workdir / "data.xyz", frames, format="extxyz")
    folder = workdir / "outputs" / "2026-01-01" / "00-00-00"
    folder.mkdir(parents=True)
    config = small_options(workdir / "data.xyz", num_epochs=2, checkpoint_interval=1)
    train_model(
        OmegaConf.create(copy.deepcopy(config)),
        output=str(workdir / "model.pt"),
        checkpoint_dir=str(folder),
    )
    return folder


@pytest.mark.slow
def test_training_writes_checkpoints_through_the_hook(run: Path) -> None:
    assert hasattr(train_model, "__wrapped__")  # the import hook's check is on
    names = sorted(p.name for p in run.iterdir() if p.suffix == ".ckpt")
    assert names == [
        "composition_model.ckpt",
        "model_0.ckpt",
        "model_1.ckpt",
        "model_latest.ckpt",
        "scaler.ckpt",
    ]
    latest = torch.load(run / "model_latest.ckpt", weights_only=False)
    assert latest["epoch"] == 1
    assert not list(run.glob(".*"))  # no temporary file left behind


@pytest.mark.slow
def test_truncated_checkpoint_names_the_previous_good_one(
    run: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "outputs" / "2026-01-01" / "00-00-00"
    shutil.copytree(run, folder)
    broken = folder / "model_latest.ckpt"
    broken.write_bytes(broken.read_bytes()[: broken.stat().st_size // 2])
    os.utime(folder / "model_0.ckpt", (1, 1))  # older than model_1.ckpt
    with pytest.raises(ValueError) as error:
        check_restart_file(broken)
    message = str(error.value)
    assert f"cannot read the restart checkpoint '{broken}'" in message
    assert f"restart from it with `mtt train OPTIONS --restart {folder}" in message
    assert "model_1.ckpt" in message


@pytest.mark.slow
def test_baseline_checkpoints_are_not_restart_files(run: Path) -> None:
    for name in ("scaler.ckpt", "composition_model.ckpt"):
        with pytest.raises(ValueError, match="fitted before the first epoch"):
            check_restart_file(run / name)


@pytest.mark.slow
def test_other_architectures_are_refused(run: Path, tmp_path: Path) -> None:
    pet = tmp_path / "pet.ckpt"
    torch.save({"architecture_name": "pet", "model_ckpt_version": 9}, pet)
    with pytest.raises(ValueError, match="checkpoint of the 'pet' architecture"):
        check_restart_file(pet)


@pytest.mark.slow
def test_restart_from_a_bad_file_through_mtt_train(run: Path, tmp_path: Path) -> None:
    """The check runs inside metatrain's ``train_model``, before its torch.load."""
    config = small_options(tmp_path / "missing.xyz")
    with pytest.raises(ValueError, match="fitted before the first epoch"):
        train_model(
            OmegaConf.create(config),
            output=str(tmp_path / "model.pt"),
            checkpoint_dir=str(tmp_path),
            restart_from=str(run / "scaler.ckpt"),
        )


def test_atomic_save_keeps_the_old_file_on_failure(tmp_path: Path) -> None:
    path = tmp_path / "a.ckpt"
    atomic_save({"epoch": 1}, path)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("crash during the write")

    with pytest.raises(RuntimeError, match="crash during the write"):
        atomic_save({"epoch": 2, "bad": Unpicklable()}, path)
    assert torch.load(path, weights_only=False) == {"epoch": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["a.ckpt"]


@pytest.mark.slow
def test_kill_during_a_checkpoint_write_then_restart_auto(
    tmp_path: Path, alloy_path: str
) -> None:
    shutil.copy(alloy_path, tmp_path / "data.xyz")
    config = small_options(Path("data.xyz"), num_epochs=4, checkpoint_interval=10)
    (tmp_path / "options.yaml").write_text(yaml.safe_dump(config))
    killed = subprocess.run(
        [sys.executable, "-c", KILLING_MTT],
        cwd=tmp_path,
        env=mtt_env(),
        capture_output=True,
        text=True,
    )
    assert killed.returncode == -9, killed.stderr[-3000:]
    (first,) = list(tmp_path.glob("outputs/*/*"))
    assert torch.load(first / "model_latest.ckpt", weights_only=False)["epoch"] == 0
    assert list(first.glob(".model_latest.ckpt.*.tmp"))  # the interrupted write

    restarted = subprocess.run(
        [str(Path(sys.executable).parent / "mtt"), "train", "options.yaml"]
        + ["--restart", "auto"],
        cwd=tmp_path,
        env=mtt_env(),
        capture_output=True,
        text=True,
    )
    assert restarted.returncode == 0, restarted.stderr[-3000:]
    log = restarted.stdout + restarted.stderr
    assert f"Restarting training from '{first.relative_to(tmp_path)}" in log
    final = torch.load(tmp_path / "model.ckpt", weights_only=False)
    assert final["epoch"] == 3
    # epochs 1, 2 and 3 ran after the restart: only the interrupted epoch was lost
    assert "Epoch:    1" in log and "Epoch:    0" not in log


@pytest.mark.slow
def test_exported_models_are_saved_atomically(
    run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``mtt export`` (and ``mtt train``'s final export) save through a temporary
    file: a save that fails half-way leaves the previous model file as it was."""
    from metatrain.utils.io import model_from_checkpoint

    checkpoint = torch.load(run / "model_latest.ckpt", weights_only=False)
    exported = model_from_checkpoint(checkpoint, context="export").export()
    path = tmp_path / "model.pt"
    exported.save(str(path))
    before = path.read_bytes()

    def half_write(module, file, _extra_files=None):
        Path(file).write_bytes(before[: len(before) // 2])
        raise OSError("No space left on device")

    monkeypatch.setattr(torch.jit, "save", half_write)
    with pytest.raises(OSError, match="No space left"):
        exported.save(str(path))
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]


# sends SIGTERM to itself in the middle of a checkpoint write (SLURM's warning
# before it kills a job): the write finishes, then the process ends as SIGTERM ends it
SIGTERM_DURING_WRITE = """
import os, signal, sys, torch
from metatrain_mace.checkpoints import atomic_save
original = torch.save
def save(obj, f, *args, **kwargs):
    os.kill(os.getpid(), signal.SIGTERM)
    return original(obj, f, *args, **kwargs)
torch.save = save
import logging
logging.basicConfig(level=logging.INFO)
atomic_save({"weights": torch.arange(1000.0)}, sys.argv[1])
print("after the write", flush=True)
"""


def test_sigterm_during_a_write_finishes_it_first(tmp_path: Path) -> None:
    path = tmp_path / "model_latest.ckpt"
    result = subprocess.run(
        [sys.executable, "-c", SIGTERM_DURING_WRITE, str(path)],
        capture_output=True,
        text=True,
        env=mtt_env(),
    )
    # the process ended by SIGTERM, after the write and before the next line
    assert result.returncode == -15, result.stderr[-3000:]
    assert "after the write" not in result.stdout
    assert torch.equal(
        torch.load(path, weights_only=True)["weights"], torch.arange(1000.0)
    )
    assert list(tmp_path.glob(".*.tmp")) == []
    assert f"SIGTERM received while writing '{path}'" in result.stderr
    assert f"mtt train OPTIONS --restart {path}" in result.stderr


def test_stale_temporaries_of_dead_processes_are_removed(tmp_path: Path) -> None:
    from metatrain_mace.checkpoints import remove_stale_temporaries_of_runs

    runs = tmp_path / "outputs"
    old, new = runs / "2026-01-01" / "10-00-00", runs / "2026-01-02" / "10-00-00"
    old.mkdir(parents=True)
    new.mkdir(parents=True)
    # a process that has ended (the pid of a finished child), and this one
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
    )
    stale = old / f".model_latest.ckpt.{int(dead.stdout)}.tmp"
    stale.write_bytes(b"PK half a checkpoint")
    alive = new / f".model_latest.ckpt.{os.getpid()}.tmp"
    alive.write_bytes(b"being written")
    other = old / "notes.tmp"
    other.write_text("not ours")
    assert remove_stale_temporaries_of_runs(new) == [stale.resolve()]
    assert not stale.exists() and alive.exists() and other.exists()
    # a restart file's folder is cleaned when the restart is checked
    stale.write_bytes(b"PK half a checkpoint")
    atomic_save({"architecture_name": "pet"}, old / "model.ckpt")
    with pytest.raises(ValueError, match="architecture"):
        check_restart_file(old / "model.ckpt")
    assert not stale.exists()
