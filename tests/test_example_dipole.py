"""The dipole example (examples/dipole) runs with the stock ``mtt`` commands.

Its ``make_data.py`` makes the data; ``mtt train`` (two epochs) and ``mtt eval`` run in
subprocesses on the example's own options. The exported model's dipoles then rotate
with the molecule, and the evaluation log reports the dipole error.
"""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import ase.io
import numpy as np
import pytest
import torch
import yaml
from metatomic.torch import ModelOutput
from metatomic_ase import MetatomicCalculator

from metatrain_mace.mace_import import o3


# whole training runs
pytestmark = pytest.mark.slow


EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "dipole"


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """Run a command of this interpreter's environment (python, mtt) in ``cwd``."""
    environment = {**os.environ}
    environment.pop("METATRAIN_MACE_DISABLE", None)
    executable = args[0]
    if executable == "mtt":
        executable = str(Path(sys.executable).parent / "mtt")
    elif executable == "python":
        executable = sys.executable
    result = subprocess.run(
        [executable, *args[1:]],
        cwd=cwd,
        capture_output=True,
        text=True,
        env=environment,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def test_dipole_example_trains_and_rotates(tmp_path: Path) -> None:
    for name in ("make_data.py", "options.yaml", "eval.yaml"):
        shutil.copy(EXAMPLE / name, tmp_path / name)
    options = yaml.safe_load((tmp_path / "options.yaml").read_text())
    options["architecture"]["training"]["num_epochs"] = 2
    (tmp_path / "options.yaml").write_text(yaml.safe_dump(options))

    run("python", "make_data.py", "--structures", "24", cwd=tmp_path)
    frames = ase.io.read(tmp_path / "dipoles.xyz", ":")
    charges = {1: 0.3, 6: -0.2, 7: -0.4, 8: -0.5}
    for atoms in frames[:3]:
        q = np.array([charges[z] for z in atoms.numbers])
        centered = atoms.positions - atoms.positions.mean(axis=0)
        # positions are written with 8 decimals
        np.testing.assert_allclose(atoms.info["REF_dipole"], q @ centered, atol=1e-6)

    run("mtt", "train", "options.yaml", "-o", "model.pt", cwd=tmp_path)
    evaluation = run(
        "mtt", "eval", "model.pt", "eval.yaml", "-o", "predictions.xyz", cwd=tmp_path
    )
    log = evaluation.stdout + evaluation.stderr
    rmse = re.search(r"mtt::dipole RMSE[^:]*: ([0-9.eE+-]+)", log)
    assert rmse is not None, log[-2000:]
    assert np.isfinite(float(rmse.group(1)))

    calculator = MetatomicCalculator(
        str(tmp_path / "model.pt"), extensions_directory=None
    )
    outputs = {"mtt::dipole": ModelOutput(sample_kind="system")}
    torch.manual_seed(0)
    worst = 0.0
    for atoms in frames[:4]:
        before = calculator.run_model(atoms, outputs)["mtt::dipole"]
        before = before.block().values[0, :, 0].detach().numpy()
        for matrix in (o3.rand_matrix(dtype=torch.float64), -torch.eye(3)):
            rotated = atoms.copy()
            rotated.positions = atoms.positions @ matrix.numpy().T
            after = calculator.run_model(rotated, outputs)["mtt::dipole"]
            after = after.block().values[0, :, 0].detach().numpy()
            worst = max(worst, np.abs(after - matrix.numpy() @ before).max())
        assert np.abs(before).max() > 1e-4
    print(f"dipole rotation error of the trained example model: {worst:.2e}")
    assert worst < 1e-10
