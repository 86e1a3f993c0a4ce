"""Small labelled datasets for the tests, made with ASE's EMT calculator.

Nothing is downloaded: molecules come from ASE's g2 collection (H, C, N, O only),
periodic Cu-Au cells from ``examples/alloy/make_data.py``.
"""

import importlib.util
from pathlib import Path

import ase
import ase.build
import ase.io
import numpy as np
from ase.build import molecule
from ase.calculators.emt import EMT
from ase.collections import g2


ROOT = Path(__file__).resolve().parents[2]

# the targets section of metatrain options for the files of make_alloy
ALLOY_TARGETS = {
    "energy": {
        "key": "REF_energy",
        "unit": "eV",
        "forces": {"key": "REF_forces"},
        "stress": {"key": "REF_stress"},
    }
}


def make_molecules(path: Path, n_structures: int = 40, seed: int = 0) -> Path:
    """Rattled H/C/N/O molecules (>= 3 atoms) with EMT energy ``U0`` and forces."""
    rng = np.random.default_rng(seed)
    names = sorted(
        name
        for name in g2.names
        if set(g2[name].get_chemical_symbols()) <= {"H", "C", "N", "O"}
        and 3 <= len(g2[name]) <= 12
    )
    frames = []
    for i in range(n_structures):
        atoms = molecule(names[i % len(names)])
        atoms.positions += rng.normal(scale=0.05, size=atoms.positions.shape)
        atoms.calc = EMT()
        energy = atoms.get_potential_energy()
        forces = atoms.get_forces()
        atoms.calc = None
        atoms.info["U0"] = energy
        atoms.arrays["REF_forces"] = forces
        frames.append(atoms)
    ase.io.write(path, frames, format="extxyz")
    return path


def make_alloy(path: Path, n_structures: int = 40, seed: int = 0) -> Path:
    """Periodic Cu-Au cells with EMT energy, forces and stress (the example's data)."""
    spec = importlib.util.spec_from_file_location(
        "alloy_make_data", ROOT / "examples" / "alloy" / "make_data.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.make_alloy_dataset(str(path), n_structures, seed)
    return path


def mixed_structures() -> list:
    """A molecule (H, C, O) and a periodic Al-Cu-Au cell, rattled: the elements
    of ``mace_files.ELEMENTS``, with and without periodicity."""
    acetaldehyde = molecule("CH3CHO")
    acetaldehyde.rattle(0.05, seed=1)
    cell = ase.build.bulk("Cu", "fcc", a=3.7, cubic=True) * (2, 1, 1)
    cell.numbers[::3] = 79
    cell.numbers[1] = 13
    cell.rattle(0.08, seed=2)
    return [acetaldehyde, cell]
