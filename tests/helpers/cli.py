"""The stock ``mtt`` command in a subprocess, and the logs of its training runs."""

import os
import subprocess
import sys
from pathlib import Path


def mtt(*args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    environment = {**os.environ}
    environment.pop("METATRAIN_MACE_DISABLE", None)
    environment.update(env)
    # the mtt of this interpreter's environment, activated or not
    return subprocess.run(
        [str(Path(sys.executable).parent / "mtt"), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        env=environment,
        check=False,
    )


def train_log(directory: Path) -> str:
    return "\n".join(p.read_text() for p in sorted(directory.glob("outputs/*/*/*.log")))
