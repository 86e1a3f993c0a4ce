"""MACE model files: loading, errors, and direct export against MACE's calculator.

The reference is mace-torch's own ``MACECalculator`` on the same file; our side is
the exported metatomic model run through metatomic's ASE calculator.
"""

import logging
from pathlib import Path
from typing import Optional

import ase
import ase.build
import numpy as np
import pytest
import torch
from mace.calculators import MACECalculator
from metatomic_ase import MetatomicCalculator
from metatrain.utils.architectures import get_default_hypers
from metatrain.utils.data import DatasetInfo
from metatrain.utils.data.target_info import get_energy_target_info
from omegaconf import OmegaConf

from datasets import mixed_structures
from mace_files import build_mace_model, save_mace_model
from metatrain_mace import export_mace_model
from metatrain_mace.model import MetaMACE
from metatrain_mace.tools.export import mace_file_to_model
from metatrain_mace.trunk.foundation import energy_baseline


structures = mixed_structures


def evaluate(calculator, atoms: ase.Atoms) -> tuple:
    atoms = atoms.copy()
    atoms.calc = calculator
    stress = atoms.get_stress() if atoms.pbc.all() else np.zeros(6)
    return atoms.get_potential_energy(), atoms.get_forces(), stress


def mace_calculator(path: Path, head: Optional[str], dtype: str) -> MACECalculator:
    kwargs = {} if head is None else {"head": head}
    return MACECalculator(
        model_paths=str(path), device="cpu", default_dtype=dtype, **kwargs
    )


def assert_agree(ours, path: Path, head: Optional[str], dtype: str) -> None:
    """float64: 1e-8 absolute. float32: 1e-5 relative to MACE's float32 results, or
    no further from MACE's float64 results than MACE's own float32 results are
    (ZBL repulsion at short C-H distances costs float32 more than 1e-5)."""
    reference = mace_calculator(path, head, dtype)
    exact = mace_calculator(path, head, "float64") if dtype == "float32" else None
    for atoms in structures():
        e, f, s = evaluate(ours, atoms)
        e_ref, f_ref, s_ref = evaluate(reference, atoms)
        if exact is None:
            assert abs(e - e_ref) <= 1e-8
            assert np.abs(f - f_ref).max() <= 1e-8
            assert np.abs(s - s_ref).max() <= 1e-8
            continue
        e64, f64, s64 = evaluate(exact, atoms)
        for value, mace32, mace64 in (
            (e, e_ref, e64),
            (f, f_ref, f64),
            (s, s_ref, s64),
        ):
            scale = max(np.abs(mace64).max(), 1e-3)
            ours_error = np.abs(value - mace64).max()
            mace_error = np.abs(mace32 - mace64).max()
            assert (
                np.abs(value - mace32).max() <= 1e-5 * scale
                or ours_error <= 1.2 * mace_error
            ), (ours_error / scale, mace_error / scale)


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
    offsets, scale = energy_baseline(model.mace, 1)
    assert scale == pytest.approx(1.1)
    mace = torch.load(path, weights_only=False)
    e0 = mace.atomic_energies_fn.atomic_energies[1]
    assert offsets[79] == pytest.approx(float(e0[-1]) + (0.1 - 0.2), abs=1e-14)
    weights = model.additive_models[0].model.weights["energy"].block().values
    assert weights.flatten().tolist() == pytest.approx(
        [offsets[z] for z in model.atomic_types], abs=1e-14
    )


def energy_dataset_info(types: list, target: str = "energy") -> DatasetInfo:
    info = get_energy_target_info(
        target, OmegaConf.create({"quantity": "energy", "unit": "eV"})
    )
    return DatasetInfo(
        length_unit="angstrom", atomic_types=types, targets={target: info}
    )


def model_hypers(path: Path, **kwargs) -> dict:
    hypers = get_default_hypers("experimental.mace")["model"]
    return {**hypers, "mace_model": str(path), **kwargs}


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.model' does not exist"):
        MetaMACE(model_hypers(tmp_path / "nope.model"), energy_dataset_info([29]))


@pytest.mark.parametrize(
    "content, message",
    [
        ("text", "is not a MACE model file: torch.load failed"),
        ("state_dict", "holds a dict"),
        ("linear", "holds a torch.nn.modules.linear.Linear, not a MACE model"),
    ],
)
def test_not_a_mace_file(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "bad.model"
    if content == "text":
        path.write_text("this is not a model\n")
    elif content == "state_dict":
        torch.save(build_mace_model().state_dict(), path)
    else:
        torch.save(torch.nn.Linear(2, 2), path)
    with pytest.raises(ValueError, match=message):
        MetaMACE(model_hypers(path), energy_dataset_info([29]))


def test_head_selection_errors(model_files: dict) -> None:
    path = model_files["multihead-zbl"]
    with pytest.raises(ValueError, match=r"several heads \['pbe', 'r2scan'\]"):
        MetaMACE(model_hypers(path), energy_dataset_info([29]))
    with pytest.raises(ValueError, match=r"'mace_head_name' is 'pbe0'.*\['pbe'"):
        MetaMACE(model_hypers(path, mace_head_name="pbe0"), energy_dataset_info([29]))


def test_unknown_elements_in_dataset(model_files: dict) -> None:
    with pytest.raises(ValueError, match=r"atomic types \[7, 92\] that the MACE"):
        MetaMACE(
            model_hypers(model_files["scaleshift"]),
            energy_dataset_info([1, 7, 29, 92]),
        )


def test_head_target_absent_from_dataset(model_files: dict) -> None:
    with pytest.raises(ValueError, match="'mace_head_target' is 'energy', but the"):
        MetaMACE(
            model_hypers(model_files["scaleshift"]),
            energy_dataset_info([29], target="mtt::dft_energy"),
        )


def test_contradicting_hypers_are_reported(
    model_files: dict, caplog: pytest.LogCaptureFixture
) -> None:
    hypers = model_hypers(
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
