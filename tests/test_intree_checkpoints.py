"""Checkpoints of metatrain's own experimental.mace are refused with the cause and
the way out (METATRAIN_MACE_DISABLE=1), which hands them to metatrain's copy."""

import gzip
import os
import shutil
import subprocess
import sys
from pathlib import Path

import metatrain
import pytest
import torch
from metatrain.utils.io import model_from_checkpoint

import metatrain_mace.mace_import  # noqa: F401 (e3nn's pickles)
from metatrain_mace.checkpoints import is_intree_checkpoint


# metatrain's wheel ships the test checkpoints of its in-tree experimental.mace
INTREE = Path(metatrain.__file__).parent / "experimental" / "mace" / "tests"
CHECKPOINTS = sorted((INTREE / "checkpoints").glob("model-v*_trainer-v*.ckpt.gz"))


def load(path: Path) -> dict:
    import metatomic.torch  # noqa: F401 (the metadata class of the pickle)

    with gzip.open(path) as file:
        return torch.load(file, weights_only=False, map_location="cpu")


def test_metatrain_ships_the_checkpoints() -> None:
    # versions 1 to 4 of metatrain 2026.4: the tests below cover every one
    versions = {path.name.split("_")[0] for path in CHECKPOINTS}
    assert versions >= {"model-v1", "model-v2", "model-v3", "model-v4"}


@pytest.mark.parametrize("path", CHECKPOINTS, ids=lambda p: p.name.split(".")[0])
@pytest.mark.parametrize("context", ["export", "finetune", "restart"])
def test_intree_checkpoints_are_refused(path: Path, context: str) -> None:
    checkpoint = load(path)
    assert is_intree_checkpoint(checkpoint)
    with pytest.raises(ValueError, match="written by metatrain's own") as error:
        model_from_checkpoint(checkpoint, context=context)
    assert "METATRAIN_MACE_DISABLE=1" in str(error.value)
    assert "upgrade metatrain" not in str(error.value)


def test_own_checkpoints_are_not_intree(tests_dir: Path) -> None:
    for path in sorted((tests_dir / "checkpoints").glob("*.ckpt.gz")):
        assert not is_intree_checkpoint(load(path))


@pytest.mark.slow
def test_mtt_export_names_the_cause_and_the_switch(tmp_path: Path) -> None:
    newest = [p for p in CHECKPOINTS if p.name.startswith("model-v4_trainer-v4")][0]
    with gzip.open(newest) as source, open(tmp_path / "model.ckpt", "wb") as target:
        shutil.copyfileobj(source, target)
    mtt = [sys.executable, "-m", "metatrain", "export", "model.ckpt", "-o", "m.pt"]
    environment = {k: v for k, v in os.environ.items() if k != "METATRAIN_MACE_DISABLE"}
    ours = subprocess.run(
        mtt, cwd=tmp_path, env=environment, capture_output=True, text=True
    )
    assert ours.returncode != 0
    output = ours.stdout + ours.stderr
    assert "written by metatrain's own 'experimental.mace'" in output
    assert "METATRAIN_MACE_DISABLE=1" in output
    assert "upgrade metatrain" not in output

    # with the switch, metatrain's own copy reads it: with the mace-torch installed
    # here its code then fails on MACE's changed module layout (its state dict
    # names the trunk mace_model.*, ours mace.*)
    (tmp_path / "error.log").unlink(missing_ok=True)
    theirs = subprocess.run(
        mtt,
        cwd=tmp_path,
        env={**environment, "METATRAIN_MACE_DISABLE": "1"},
        capture_output=True,
        text=True,
    )
    output = theirs.stdout + theirs.stderr
    assert "written by metatrain's own" not in output
    assert theirs.returncode != 0 and "mace_model.products.0" in output
    traceback = (tmp_path / "error.log").read_text()
    assert "metatrain/experimental/mace/model.py" in traceback
    assert "metatrain_mace" not in traceback
