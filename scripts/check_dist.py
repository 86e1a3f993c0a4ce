"""Check the sdist and wheel built by ``python -m build`` (the tox ``build`` env).

Usage: ``python scripts/check_dist.py DIST_DIR``. Fails (exit status 1, listing
every problem) unless

- the wheel holds the import hook (``metatrain_mace_hook.pth`` at the root of
  site-packages, with the same content as ``src/``, and ``metatrain_mace_hook.py``),
  every module of ``src/metatrain_mace`` and the package data (``py.typed``),
- the wheel declares the ``metatrain.architectures`` entry point and a torch
  requirement bounded above (never a bare ``torch``, which would pull a CUDA build),
- the sdist holds the ``.pth`` source, ``setup.py`` and the default hypers file.
"""

import re
import sys
import tarfile
import zipfile
from pathlib import Path
from typing import List


ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "src"
HOOK_PTH = "metatrain_mace_hook.pth"
HOOK_MODULE = "metatrain_mace_hook.py"
PACKAGE_DATA = ["metatrain_mace/py.typed"]
SDIST_FILES = [
    f"src/{HOOK_PTH}",
    f"src/{HOOK_MODULE}",
    "setup.py",
    "pyproject.toml",
    "default_hypers/mace-default-hypers.yaml",
]


def check_wheel(path: Path) -> List[str]:
    """Problems of one wheel."""
    problems = []
    with zipfile.ZipFile(path) as wheel:
        names = set(wheel.namelist())
        modules = sorted(
            module.relative_to(SOURCE).as_posix()
            for module in (SOURCE / "metatrain_mace").rglob("*.py")
        )
        for name in [HOOK_PTH, HOOK_MODULE, *modules, *PACKAGE_DATA]:
            if name not in names:
                problems.append(f"{path.name}: {name} is missing")
        if HOOK_PTH in names:
            if wheel.read(HOOK_PTH) != (SOURCE / HOOK_PTH).read_bytes():
                problems.append(f"{path.name}: {HOOK_PTH} differs from src/")

        dist_info = next(
            (n.split("/")[0] for n in names if n.endswith(".dist-info/METADATA")), None
        )
        if dist_info is None:
            return [*problems, f"{path.name}: no METADATA"]
        entry_points = wheel.read(f"{dist_info}/entry_points.txt").decode()
        if not re.search(
            r"\[metatrain\.architectures\]\s*experimental\.mace\s*=\s*metatrain_mace",
            entry_points,
        ):
            problems.append(f"{path.name}: the metatrain.architectures entry point")
        metadata = wheel.read(f"{dist_info}/METADATA").decode()
        torch = re.findall(r"^Requires-Dist: torch\b(.*)$", metadata, re.M)
        if len(torch) != 1 or "<" not in torch[0]:
            problems.append(f"{path.name}: torch requirement {torch} is not bounded")
    return problems


def check_sdist(path: Path) -> List[str]:
    """Problems of one sdist."""
    with tarfile.open(path) as sdist:
        names = {name.split("/", 1)[-1] for name in sdist.getnames()}
    return [
        f"{path.name}: {name} is missing" for name in SDIST_FILES if name not in names
    ]


def main(argv: List[str]) -> int:
    """Check the single wheel and sdist found in ``argv[0]``."""
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    dist = Path(argv[0])
    wheels = sorted(dist.glob("metatrain_mace-*.whl"))
    sdists = sorted(dist.glob("metatrain_mace-*.tar.gz"))
    problems = []
    if len(wheels) != 1 or len(sdists) != 1:
        problems.append(
            f"expected one wheel and one sdist in {dist}: {wheels + sdists}"
        )
    for wheel in wheels:
        problems += check_wheel(wheel)
    for sdist in sdists:
        problems += check_sdist(sdist)
    for problem in problems:
        print(f"FAIL {problem}", file=sys.stderr)
    if problems:
        return 1
    print(f"OK: {wheels[0].name} and {sdists[0].name}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
