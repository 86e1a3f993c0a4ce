"""The package's layout: no import cycle and no import up the layers that
``scripts/import_graph.py`` defines (the docs page "How the code is organised")."""

import subprocess
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]


def test_no_import_cycle_and_no_arrow_up() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "import_graph.py")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert " 0 cycles, 0 arrows up" in result.stdout


def test_the_graph_finds_cycles_and_arrows_up(tmp_path: Path) -> None:
    """The check can fail: a package with a cycle and an arrow up is refused."""
    package = tmp_path / "metatrain_mace"
    (package / "trunk").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "trunk" / "__init__.py").write_text("")
    (package / "trunk" / "a.py").write_text("from metatrain_mace.trunk import b\n")
    (package / "trunk" / "b.py").write_text(
        "import metatrain_mace.trunk.a\nfrom metatrain_mace.model import X\n"
    )
    (package / "model.py").write_text("X = 1\n")
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "import_graph.py"), str(tmp_path)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1
    assert "cycle: metatrain_mace.trunk.a <-> metatrain_mace.trunk.b" in result.stdout
    assert "arrow up: metatrain_mace.trunk.b -> metatrain_mace.model" in result.stdout
