"""MACE model files: loading, errors, and direct export against MACE's calculator.

The reference is mace-torch's own ``MACECalculator`` on the same file; our side is
the exported metatomic model run through metatomic's ASE calculator.
"""

import logging
import sys
import types
from pathlib import Path
from typing import Optional

import pytest
import torch
from metatomic_ase import MetatomicCalculator

from helpers.mace_files import build_mace_model, save_mace_model
from helpers.options import energy_dataset_info, file_model
from helpers.parity import assert_agree
from metatrain_mace import export_mace_model
from metatrain_mace.model import MetaMACE
from metatrain_mace.tools.export import mace_file_to_model
from metatrain_mace.trunk.foundation import energy_baseline


FILES = {
    "scaleshift": dict(),
    "plain-mace": dict(scale_shift=False),
    "multihead-zbl": dict(heads=["pbe", "r2scan"], pair_repulsion=True),
    "float32-file": dict(dtype=torch.float32),
}


@pytest.fixture(scope="module")
def model_files(tmp_path_factory: pytest.TempPathFactory) -> dict:
    directory = tmp_path_factory.mktemp("mace_files")
    return {
        name: save_mace_model(directory / f"{name}.model", seed=i, **kwargs)
        for i, (name, kwargs) in enumerate(FILES.items())
    }


@pytest.mark.parametrize(
    "name, head",
    [
        ("scaleshift", None),
        ("plain-mace", None),
        ("multihead-zbl", "pbe"),
        ("multihead-zbl", "r2scan"),
        ("float32-file", None),
    ],
)
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_direct_export_matches_mace(
    model_files: dict, tmp_path: Path, name: str, head: Optional[str], dtype: str
) -> None:
    output = tmp_path / "model.pt"
    export_mace_model(str(model_files[name]), str(output), head=head, dtype=dtype)
    ours = MetatomicCalculator(str(output), device="cpu")
    assert_agree(ours, model_files[name], head, dtype)


def test_parameters_saved_frozen_train(tmp_path: Path) -> None:
    """mace_run_train saves its stage-two model with requires_grad=False on every
    parameter: training from such a file must still train MACE."""
    mace = build_mace_model(seed=3).requires_grad_(False)
    torch.save(mace, tmp_path / "stagetwo.model")
    model = MetaMACE(
        file_model(tmp_path / "stagetwo.model"), energy_dataset_info([1, 6, 8])
    )
    trunk = dict(model.trunk.mace.named_parameters())
    assert len(trunk) == len(list(mace.parameters())) > 10
    assert all(parameter.requires_grad for parameter in trunk.values())


def test_model_keeps_every_element_of_the_file(model_files: dict) -> None:
    model = mace_file_to_model(str(model_files["scaleshift"]))
    assert model.atomic_types == [1, 6, 8, 13, 29, 79]
    capabilities = model.export().capabilities()
    assert capabilities.atomic_types == [1, 6, 8, 13, 29, 79]
    assert capabilities.interaction_range == pytest.approx(2 * 4.5)


def test_baselines_come_from_the_file(model_files: dict) -> None:
    """E0 + shift in the composition model, the scale in the scaler."""
    path = model_files["multihead-zbl"]
    model = mace_file_to_model(str(path), head="r2scan")
    offsets, scale = energy_baseline(model.trunk.mace, 1)
    assert scale == pytest.approx(1.1)
    mace = torch.load(path, weights_only=False)
    e0 = mace.atomic_energies_fn.atomic_energies[1]
    assert offsets[79] == pytest.approx(float(e0[-1]) + (0.1 - 0.2), abs=1e-14)
    weights = model.additive_models[0].model.weights["energy"].block().values
    assert weights.flatten().tolist() == pytest.approx(
        [offsets[z] for z in model.atomic_types], abs=1e-14
    )


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.model' does not exist"):
        MetaMACE(file_model(tmp_path / "nope.model"), energy_dataset_info([29]))


@pytest.mark.parametrize(
    "content, message",
    [
        ("text", r"\('mace_model'\) is not a MACE model file: torch.load cannot"),
        ("cut short", r"\('mace_model'\) is cut short: .* Download or copy the MACE"),
        ("state_dict", r"\('mace_model'\) holds a dict"),
        ("linear", r"holds a torch.nn.modules.linear.Linear, not a MACE model"),
    ],
)
def test_not_a_mace_file(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "bad.model"
    if content == "text":
        path.write_text("this is not a model\n")
    elif content == "state_dict":
        torch.save(build_mace_model().state_dict(), path)
    elif content == "cut short":
        torch.save(build_mace_model(), path)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    else:
        torch.save(torch.nn.Linear(2, 2), path)
    with pytest.raises(ValueError, match=message):
        MetaMACE(file_model(path), energy_dataset_info([29]))


def test_head_selection_errors(model_files: dict) -> None:
    path = model_files["multihead-zbl"]
    with pytest.raises(ValueError, match=r"several heads \['pbe', 'r2scan'\]"):
        MetaMACE(file_model(path), energy_dataset_info([29]))
    with pytest.raises(ValueError, match=r"'mace_head_name' is 'pbe0'.*\['pbe'"):
        MetaMACE(file_model(path, mace_head_name="pbe0"), energy_dataset_info([29]))


def test_unknown_elements_in_dataset(model_files: dict) -> None:
    with pytest.raises(ValueError, match=r"atomic types \[7, 92\] that the MACE"):
        MetaMACE(
            file_model(model_files["scaleshift"]),
            energy_dataset_info([1, 7, 29, 92]),
        )


def test_head_target_absent_from_dataset(model_files: dict) -> None:
    with pytest.raises(ValueError, match="'mace_head_target' is 'energy', but the"):
        MetaMACE(
            file_model(model_files["scaleshift"]),
            energy_dataset_info([29], target="mtt::dft_energy"),
        )


def test_contradicting_hypers_are_reported(
    model_files: dict, caplog: pytest.LogCaptureFixture
) -> None:
    hypers = file_model(
        model_files["scaleshift"], r_max=6.0, hidden_irreps="8x0e + 8x1o", gate="tanh"
    )
    with caplog.at_level(logging.WARNING):
        model = MetaMACE(hypers, energy_dataset_info([29, 79]))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("'r_max: 6.0' is ignored" in w and "4.5" in w for w in warnings)
    assert any("'gate: 'tanh'' is ignored" in w for w in warnings)
    # equal to the file's value: not a contradiction
    assert not any("hidden_irreps" in w for w in warnings)
    assert model.r_max == 4.5


def _pickled_as(path: Path, class_name: str, **attributes) -> Path:
    """A small MACE saved as mace-torch saves ``class_name`` (its pickle names the
    class; only the class matters to the loader), with extra submodules."""
    from mace.modules import extensions, models

    model = build_mace_model()
    model.__class__ = getattr(extensions, class_name, None) or getattr(
        models, class_name
    )
    for name, module in attributes.items():
        setattr(model, name, module)
    torch.save(model, path)
    return path


def _fake_package(name: str) -> types.ModuleType:
    """A module ``name`` with one torch module class, as a package of its own."""
    package = types.ModuleType(name)

    class Part(torch.nn.Module):
        pass

    Part.__module__ = name
    Part.__qualname__ = "Part"
    package.Part = Part
    return package


@pytest.mark.parametrize("class_name", ["MACELES", "PolarMACE"])
def test_mace_kinds_not_run_yet_are_refused(tmp_path: Path, class_name) -> None:
    """Loaded as a plain MACE (MACELES and PolarMACE are ScaleShiftMACEs) they
    would silently lose their long-range part (the dipole classes are supported:
    tests/trunk/test_dipole_classes.py)."""
    path = _pickled_as(tmp_path / "file.model", class_name)
    with pytest.raises(ValueError, match=f"holds a {class_name}: .* does not run"):
        mace_file_to_model(str(path))


@pytest.mark.parametrize(
    "package, message",
    [
        ("les", r"not on PyPI .*\(CC-BY-NC-4.0\).*github.com/ChengUCB/les"),
        ("graph_longrange", r"pip install graph-longrange==0.4.0"),
    ],
)
def test_files_needing_a_missing_package_say_which_and_how(
    tmp_path: Path, monkeypatch, package, message
) -> None:
    fake = _fake_package(package)
    monkeypatch.setitem(sys.modules, package, fake)
    class_name = "MACELES" if package == "les" else "PolarMACE"
    path = _pickled_as(tmp_path / "file.model", class_name, extra=fake.Part())
    # with the package importable, the file loads and its class is refused
    with pytest.raises(ValueError, match=f"holds a {class_name}"):
        mace_file_to_model(str(path))
    monkeypatch.delitem(sys.modules, package)
    with pytest.raises(ValueError, match=message):
        mace_file_to_model(str(path))
