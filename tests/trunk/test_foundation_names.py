"""MACE foundation models by name, without network: small model files are put
where mace-torch's cache keeps the real ones (``XDG_CACHE_HOME`` points at a
temporary folder), and mace-torch's downloader is replaced by one that fails."""

import logging
import os
import subprocess
import sys
import urllib.error
from pathlib import Path

import ase.build
import pytest
from mace.calculators import foundations_models

from helpers.mace_files import CHARGE_SPIN_SPECS, save_mace_model
from helpers.options import energy_dataset_info, file_model
from helpers.parity import assert_agree, assert_parity, evaluate, mace_calculator
from metatrain_mace import export_mace_model
from metatrain_mace.trunk import foundation_names


@pytest.fixture
def cache(tmp_path: Path, monkeypatch) -> Path:
    """An empty mace-torch cache and a downloader that never reaches the network."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    calls = []

    def offline(url, filename, *args, **kwargs):
        calls.append(url)
        raise urllib.error.URLError("no network in the tests")

    monkeypatch.setattr(foundations_models, "_urlretrieve_with_timeout", offline)
    directory = tmp_path / "xdg" / "mace"
    directory.mkdir(parents=True)
    return directory


def test_the_names_of_mace_torch() -> None:
    names = foundation_names.valid_names()
    for name in [
        "mace_mp:medium-mpa-0",
        "mace_mp:small",
        "mace_mp:mh-1",
        "mace_off:small",
        "mace_omol:extra_large",
        "medium-mpa-0",
        "mh-1",
        "extra_large",
    ]:
        assert name in names, name
    # "small" is both mace_mp's and mace_off's
    assert "small" not in names
    with pytest.raises(ValueError, match="'mace_mp:small', 'mace_off:small'"):
        foundation_names.lookup("small")
    omol = foundation_names.lookup("mace_omol:extra_large")
    assert omol.url.endswith("MACE-omol-0-extra-large-1024.model")
    assert omol.head == "omol"


@pytest.mark.parametrize("name", ["mace_mp:small", "medium-mpa-0", "mace_off:small"])
def test_a_cached_model_loads_by_name(cache: Path, tmp_path: Path, name, caplog):
    model = foundation_names.lookup(name)
    file = save_mace_model(model.cache_file(), seed=5)
    assert file.parent == cache
    if model.family == "mace_mp":
        # the file is where mace-torch's own resolver looks first
        assert foundations_models.download_mace_mp_checkpoint(model.name) == str(file)
    output = tmp_path / "model.pt"
    with caplog.at_level(logging.INFO):
        export_mace_model(name, str(output), dtype="float64")
    assert f"Using {model.label} from mace-torch's cache: {file}" in caplog.text
    from metatomic_ase import MetatomicCalculator

    assert_agree(MetatomicCalculator(str(output)), file, None, "float64")


def test_mace_omol_by_name_picks_the_omol_head(cache: Path, tmp_path: Path, caplog):
    model = foundation_names.lookup("mace_omol:extra_large")
    file = save_mace_model(
        model.cache_file(),
        seed=6,
        heads=["pt_head", "omol"],
        embedding_specs=CHARGE_SPIN_SPECS,
        use_embedding_readout=True,
    )
    output = tmp_path / "omol.pt"
    with caplog.at_level(logging.INFO):
        export_mace_model("mace_omol:extra_large", str(output), dtype="float64")
    assert "Using the head 'omol' of the MACE model" in caplog.text
    assert_parity(output, file, head="omol")


def test_multihead_default_head_as_mace_calculator(tmp_path: Path, caplog) -> None:
    """A file (by path) with a head called 'Default' uses it, as MACECalculator."""
    from metatrain_mace.model import MetaMACE

    path = save_mace_model(tmp_path / "mh.model", heads=["omat_pbe", "Default"])
    with caplog.at_level(logging.INFO):
        model = MetaMACE(file_model(path), energy_dataset_info([29]))
    assert model.trunk.head_index == 1
    assert "Using the head 'Default'" in caplog.text


def test_not_cached_and_no_network(cache: Path) -> None:
    model = foundation_names.lookup("mace_off:large")
    with pytest.raises(RuntimeError) as error:
        export_mace_model("mace_off:large", None)
    message = str(error.value)
    assert model.url in message
    assert str(cache / "MACE-OFF23_large.model") in message
    assert not (cache / "MACE-OFF23_large.model").exists()
    # the same through mace_mp's downloader
    with pytest.raises(RuntimeError, match="could not download the MACE foundation"):
        export_mace_model("mh-1", None)


def test_unknown_name(cache: Path) -> None:
    with pytest.raises(ValueError, match="Valid names: mace_mp:small, ") as error:
        export_mace_model("xyzzy", None)
    # nothing close enough: no suggestion, the names in their table order
    assert "Did you mean" not in str(error.value)
    with pytest.raises(ValueError) as error:
        export_mace_model("mace_of:small", None)
    message = str(error.value)
    # the closest names first, then every other valid name once
    assert "Did you mean 'mace_off:small' or 'mace_mp:small'" in message
    listed = message.split("Valid names: ")[1].split(", ")
    assert listed[0] == "mace_off:small"
    assert sorted(listed) == sorted(foundation_names.valid_names())
    with pytest.raises(ValueError, match="Did you mean 'mace_mp:mh-1' or 'mh-1'"):
        export_mace_model("mh1", None)
    with pytest.raises(ValueError, match="Did you mean 'mace_mp:large'"):
        export_mace_model("mace-mp-large", None)
    # paths are never taken for names
    with pytest.raises(FileNotFoundError, match="does not exist"):
        export_mace_model("models/medium.model", None)


@pytest.mark.slow
def test_export_command_by_name(tmp_path: Path) -> None:
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "xdg")}
    model = foundation_names.lookup("mace_off:medium")
    file = tmp_path / "xdg" / "mace" / model.cache_file().name
    file.parent.mkdir(parents=True)
    save_mace_model(file, seed=7)
    result = subprocess.run(
        [str(Path(sys.executable).parent / "metatrain-mace"), "export"]
        + ["mace_off:medium", "-o", "off.pt"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    from metatomic_ase import MetatomicCalculator

    assert_agree(MetatomicCalculator(str(tmp_path / "off.pt")), file, None, "float64")


def test_mace_anicc_by_name(cache: Path, tmp_path: Path, monkeypatch, caplog):
    """mace_anicc keeps its model inside mace-torch's folder (module_dir here
    points at a temporary one); the family name alone names its only model."""
    monkeypatch.setattr(foundations_models, "module_dir", str(tmp_path / "mace-dir"))
    model = foundation_names.lookup("mace_anicc")
    assert model.label == "mace_anicc:ani500k_large_CC"
    assert model.url.endswith("/ani500k_large_CC.model")
    assert "mace_anicc" in foundation_names.valid_names()
    assert model.cache_file() == (
        tmp_path / "mace-dir" / "foundations_models" / "ani500k_large_CC.model"
    )
    # not there yet: the offline download fails and says where to put the file
    with pytest.raises(RuntimeError, match="ani500k_large_CC") as error:
        export_mace_model("mace_anicc", str(tmp_path / "x.pt"))
    assert str(model.cache_file()) in str(error.value)

    # (fetch made the folder, as mace-torch's own download would)
    file = save_mace_model(model.cache_file(), atomic_numbers=[1, 6, 7, 8], seed=7)
    output = tmp_path / "model.pt"
    with caplog.at_level(logging.INFO):
        export_mace_model("mace_anicc", str(output), dtype="float64")
    assert f"Using {model.label} from mace-torch's cache: {file}" in caplog.text
    from metatomic_ase import MetatomicCalculator

    molecule = ase.build.molecule("CH3CONH2")
    molecule.rattle(0.05, seed=1)
    calculator = MetatomicCalculator(str(output))
    e, f, _ = evaluate(calculator, molecule)
    e_ref, f_ref, _ = evaluate(mace_calculator(file, None, "float64"), molecule)
    assert abs(e - e_ref) < 1e-8 and abs(f - f_ref).max() < 1e-8
