"""The Python 3.12 environment of the TorchSim test (``.venv-torchsim`` at the root
of the repository), made from ``torchsim-requirements.txt`` beside this file on first
use, and again whenever that file changes. ``python tests/engines/torchsim_env.py``
makes it ahead of the tests (CI does, while the example trains).

PyPI's torch for Python 3.12 is a CUDA build (about 5 GB with its libraries): it is
installed here only, never in the main environment.
"""

import glob
import os
import shutil
import subprocess
from pathlib import Path


ROOT = Path(__file__).resolve().parents[2]
TORCHSIM_ENV = ROOT / ".venv-torchsim"
REQUIREMENTS = Path(__file__).parent / "torchsim-requirements.txt"


def _python312() -> str:
    """A Python 3.12 interpreter (TorchSim needs >= 3.12)."""
    candidates = [os.environ.get("METATRAIN_MACE_PYTHON312", ""), "python3.12"]
    candidates += sorted(
        glob.glob(os.path.expanduser("~/.pyenv/versions/3.12*/bin/python3.12"))
    )
    for candidate in candidates:
        path = shutil.which(candidate) if candidate else None
        if path is None:
            continue
        check = subprocess.run([path, "--version"], capture_output=True, text=True)
        if check.returncode == 0 and check.stdout.startswith("Python 3.12"):
            return path
    raise RuntimeError(
        "the TorchSim test needs Python 3.12 (TorchSim requires >= 3.12): install it, "
        "or set METATRAIN_MACE_PYTHON312 to its interpreter"
    )


def torchsim_python() -> Path:
    """The interpreter of the TorchSim environment, made on first use (about 5 GB:
    PyPI's torch for Python 3.12 is a CUDA build; it never enters the main env)."""
    python = TORCHSIM_ENV / "bin" / "python"
    requirements = REQUIREMENTS
    stamp = TORCHSIM_ENV / "requirements.txt"
    if (
        python.exists()
        and stamp.exists()
        and stamp.read_text() == requirements.read_text()
    ):
        return python
    shutil.rmtree(TORCHSIM_ENV, ignore_errors=True)
    subprocess.run([_python312(), "-m", "venv", str(TORCHSIM_ENV)], check=True)
    install = subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "-r", str(requirements)],
        capture_output=True,
        text=True,
    )
    assert install.returncode == 0, install.stdout + install.stderr[-3000:]
    shutil.copy(requirements, stamp)
    return python


if __name__ == "__main__":
    print(torchsim_python())
