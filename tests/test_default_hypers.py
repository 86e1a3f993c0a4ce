"""The committed default hyperparameters file must match ``documentation.py``."""

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest
import yaml
from metatrain.utils.architectures import (
    check_architecture_options,
    get_default_hypers,
)


ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "write_default_hypers.py"
DEFAULTS_FILE = ROOT / "default_hypers" / "mace-default-hypers.yaml"


@pytest.fixture(scope="module")
def writer() -> ModuleType:
    spec = importlib.util.spec_from_file_location("write_default_hypers", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_file_is_up_to_date(writer: ModuleType) -> None:
    assert DEFAULTS_FILE.read_text() == writer.generate(), (
        f"{DEFAULTS_FILE.relative_to(ROOT)} drifted from documentation.py: "
        "regenerate it with 'python scripts/write_default_hypers.py'"
    )


def test_file_holds_the_architecture_defaults() -> None:
    content = yaml.safe_load(DEFAULTS_FILE.read_text())
    assert list(content) == ["architecture"]
    architecture = content["architecture"]
    assert architecture == get_default_hypers("experimental.mace")
    assert architecture["name"] == "experimental.mace"
    assert architecture["model"]["mace_head_target"] == "energy"
    assert architecture["training"]["optimizer"] == "adam"
    # metatrain accepts the section as it is
    check_architecture_options("experimental.mace", architecture)


def test_check_mode_reports_drift(
    writer: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    stale = tmp_path / "hypers.yaml"
    stale.write_text(writer.generate().replace("r_max: 5.0", "r_max: 6.0"))
    assert writer.main(["--check", "--output", str(stale)]) == 1
    assert "scripts/write_default_hypers.py" in capsys.readouterr().err

    assert writer.main(["--output", str(stale)]) == 0
    assert writer.main(["--check", "--output", str(stale)]) == 0
    assert stale.read_text() == DEFAULTS_FILE.read_text()
