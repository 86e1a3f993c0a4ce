"""Errors of the ``metatrain-mace`` command in the command's own words: the argument
that is wrong, why, and what to do; a message alone, no traceback, exit status 2."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers.mace_files import build_mace_model


# every test runs the command in a subprocess
pytestmark = pytest.mark.slow


def metatrain_mace(*args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(Path(sys.executable).parent / "metatrain-mace"), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        check=False,
    )


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict:
    folder = tmp_path_factory.mktemp("files")
    whole = folder / "whole.model"
    torch.save(build_mace_model(), whole)
    data = whole.read_bytes()
    (folder / "cut.model").write_bytes(data[: len(data) // 2])
    (folder / "notes.model").write_text("not a model\n")
    torch.save(
        {"architecture_name": "pet", "model_data": {}, "model_state_dict": {}},
        folder / "run.ckpt",
    )
    return {path.stem: path for path in folder.iterdir()}


def assert_clean_error(result: subprocess.CompletedProcess, command: str) -> str:
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert f"metatrain-mace {command}: error: " in result.stderr
    return result.stderr


@pytest.mark.parametrize("command", ["export", "precision"])
def test_cut_short_and_foreign_files(files, tmp_path: Path, command: str) -> None:
    extra = [str(files["whole"])] if command == "precision" else []
    argument = "PATH" if command == "export" else "MODEL"
    for name, expected in (
        ("cut", "is cut short: it starts as a file written by torch.save"),
        ("notes", "is not a MACE model file: torch.load cannot read it"),
    ):
        args = [command, str(files[name])]
        if command == "precision":
            args.append(extra[0])
        stderr = assert_clean_error(metatrain_mace(*args, cwd=tmp_path), command)
        assert f"(the {argument} argument of metatrain-mace {command})" in stderr
        assert expected in stderr
        # the hyper of mtt train means nothing to a user of the command
        assert "'mace_model'" not in stderr


def test_export_of_a_checkpoint_points_to_mtt_export(files, tmp_path: Path) -> None:
    stderr = assert_clean_error(
        metatrain_mace("export", str(files["run"]), cwd=tmp_path), "export"
    )
    assert "use 'mtt export CHECKPOINT'" in stderr
    assert "finetune" not in stderr and "--restart" not in stderr


def test_offline_foundation_name_prints_the_message_alone(tmp_path: Path) -> None:
    """No network here: the download fails, and the command prints the message
    (address, where to put the file) without a traceback."""
    result = metatrain_mace(
        "export", "mace_off:small", cwd=tmp_path, XDG_CACHE_HOME=str(tmp_path / "xdg")
    )
    stderr = assert_clean_error(result, "export")
    assert "could not download the MACE foundation model mace_off:small" in stderr
    assert str(tmp_path / "xdg" / "mace") in stderr


def test_export_writes_only_the_model(files, tmp_path: Path) -> None:
    """The baselines metatrain fits on the way are not left in the user's folder."""
    result = metatrain_mace("export", str(files["whole"]), "-o", "m.pt", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt"]
