"""Comparisons of predictions: exported models against MACE's own calculator (with
and without charge and spin), and every block of every target of a model."""

from pathlib import Path
from typing import Dict, Optional

import ase
import ase.build
import numpy as np
import torch
from mace.calculators import MACECalculator
from metatomic.torch import systems_to_torch
from metatomic_ase import MetatomicCalculator
from metatrain.utils.data import DatasetInfo
from metatrain.utils.evaluate_model import evaluate_model
from metatrain.utils.neighbor_lists import get_system_with_neighbor_lists

from helpers.datasets import mixed_structures


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
    for atoms in mixed_structures():
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


STATES = [(0, 1), (1, 2), (-1, 2)]  # neutral singlet, cation and anion doublets


def charged_structures() -> list:
    molecule = ase.build.molecule("CH3CHO")
    molecule.rattle(0.05, seed=1)
    cell = ase.build.bulk("Cu", "fcc", a=3.7, cubic=True) * (2, 1, 1)
    cell.numbers[::3] = 79
    cell.rattle(0.08, seed=2)
    return [molecule, cell]


def evaluate_charged(calculator, atoms: ase.Atoms, charge: int, spin: int) -> tuple:
    atoms = atoms.copy()
    atoms.info["charge"] = charge
    atoms.info["spin"] = spin
    atoms.calc = calculator
    stress = atoms.get_stress() if atoms.pbc.all() else np.zeros(6)
    return atoms.get_potential_energy(), atoms.get_forces(), stress


def assert_parity(exported: Path, file: Path, head=None) -> None:
    ours = MetatomicCalculator(str(exported), device="cpu")
    kwargs = {} if head is None else {"head": head}
    reference = MACECalculator(
        model_paths=str(file), device="cpu", default_dtype="float64", **kwargs
    )
    for atoms in charged_structures():
        energies = []
        for charge, spin in STATES:
            e, f, s = evaluate_charged(ours, atoms, charge, spin)
            e_ref, f_ref, s_ref = evaluate_charged(reference, atoms, charge, spin)
            # measured: 4e-16 eV, 1e-15 eV/A
            assert abs(e - e_ref) <= 1e-8, (charge, spin, e, e_ref)
            assert np.abs(f - f_ref).max() <= 1e-8
            assert np.abs(s - s_ref).max() <= 1e-8
            energies.append(e)
        # the states really differ
        assert abs(energies[1] - energies[0]) > 1e-4, energies


def predict(model: torch.nn.Module, atoms_list, info: DatasetInfo) -> Dict:
    """Every block (values and gradients) of every target, as float64 tensors."""
    systems = [
        get_system_with_neighbor_lists(system, model.requested_neighbor_lists())
        for system in systems_to_torch(atoms_list, dtype=torch.float64)
    ]
    results = evaluate_model(model, systems, info.targets, is_training=False)
    values: Dict[str, torch.Tensor] = {}
    for name, tensor in results.items():
        for i, block in enumerate(tensor.blocks()):
            values[f"{name}[{i}]"] = block.values.detach()
            for parameter, gradient in block.gradients():
                values[f"{name}[{i}]/{parameter}"] = gradient.values.detach()
    return values
