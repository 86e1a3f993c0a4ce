"""The import hook: ``metatrain.experimental.mace`` is ``metatrain_mace``."""

import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

import metatrain
import pytest

import metatrain_mace


def run_python(code: str, **env: str) -> str:
    environment = {**os.environ, **env}
    environment.pop("METATRAIN_MACE_DISABLE", None)
    environment.update(env)
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=environment,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().splitlines()[-1]


def test_hook_runs_at_start_without_heavy_imports() -> None:
    out = run_python(
        "import sys; print(sorted(m for m in ('torch', 'mace', 'metatrain', "
        "'metatrain_mace_hook') if m in sys.modules))"
    )
    assert out == "['metatrain_mace_hook']"


def test_documentation_imports_without_torch_or_mace() -> None:
    out = run_python(
        "import sys, metatrain_mace.documentation as d; "
        "print('torch' in sys.modules, 'mace' in sys.modules, "
        "len(d.ModelHypers.__annotations__) > 20)"
    )
    assert out == "False False True"


@pytest.mark.slow
def test_alias_modules_are_the_same_objects() -> None:
    out = run_python(
        "import metatrain.experimental.mace as alias, metatrain_mace, "
        "metatrain.experimental.mace.model as am, metatrain_mace.model as m, "
        "metatrain.experimental.mace.documentation as ad, "
        "metatrain_mace.documentation as d; "
        "print(alias is metatrain_mace, am is m, ad is d, "
        "alias.__spec__.name, am.__spec__.name)"
    )
    assert out == "True True True metatrain_mace metatrain_mace.model"


def test_same_objects_in_this_process() -> None:
    import metatrain.experimental.mace as alias
    import metatrain.experimental.mace.model as alias_model

    assert alias is metatrain_mace
    assert alias_model.MetaMACE is metatrain_mace.MetaMACE


@pytest.mark.slow
def test_disable_keeps_metatrain_copy() -> None:
    out = run_python(
        "from metatrain.utils.architectures import import_architecture; "
        "print(import_architecture('experimental.mace').__file__)",
        METATRAIN_MACE_DISABLE="1",
    )
    metatrain_dir = Path(metatrain.__file__).parent
    assert Path(out).parent == metatrain_dir / "experimental" / "mace"


@pytest.mark.slow
def test_register_overrides_explicitly() -> None:
    out = run_python(
        "import metatrain.experimental.mace as before; import metatrain_mace; "
        "metatrain_mace.register(); "
        "import importlib; after = importlib.import_module("
        "'metatrain.experimental.mace'); "
        "print(before is metatrain_mace, after is metatrain_mace)",
        METATRAIN_MACE_DISABLE="1",
    )
    assert out == "False True"


def test_entry_point() -> None:
    points = importlib.metadata.entry_points(group="metatrain.architectures")
    (point,) = [p for p in points if p.name == "experimental.mace"]
    assert point.value == "metatrain_mace"
    assert point.load() is metatrain_mace


def test_regular_install_from_wheel(tmp_path: Path) -> None:
    """``pip install .`` (a wheel, not editable) also installs the hook."""
    root = Path(__file__).resolve().parents[1]
    pip = [sys.executable, "-m", "pip"]
    subprocess.run(
        [
            *pip,
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            tmp_path,
            root,
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("metatrain_mace-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True)
    python = venv / "bin" / "python"
    site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    # dependencies come from this environment (a plain path entry, so that its
    # own editable install of metatrain-mace is not picked up)
    deps = [p for p in sys.path if p.endswith("site-packages")]
    Path(site, "zz_dependencies.pth").write_text("\n".join(deps) + "\n")
    subprocess.run(
        [*pip, "install", "-q", "--no-deps", "--no-index", "--target", site, wheel],
        check=True,
        capture_output=True,
    )
    result = subprocess.run(
        [
            python,
            "-c",
            "import metatrain_mace, metatrain.experimental.mace as m; "
            "print(m is metatrain_mace, metatrain_mace.__file__)",
        ],
        capture_output=True,
        text=True,
        env={k: v for k, v in os.environ.items() if k != "METATRAIN_MACE_DISABLE"},
        check=False,
    )
    assert result.returncode == 0, result.stderr
    alias, location = result.stdout.split()
    assert alias == "True"
    assert Path(location).is_relative_to(site)
