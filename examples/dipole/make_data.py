"""Make a small molecular dipole dataset from fixed partial charges.

Rattled H/C/N/O molecules of ASE's g2 collection; the dipole of each one is
``sum_i q_i (r_i - r_center)`` with a fixed partial charge per element and the mean
position as center, a Cartesian vector per structure that rotates with the molecule.
Written as extended XYZ under the key ``REF_dipole`` (ASE would take a plain ``dipole``
for a calculator result).

    python make_data.py [--structures 80] [--output dipoles.xyz] [--seed 0]
"""

import argparse

import ase.io
import numpy as np
from ase.build import molecule
from ase.collections import g2


# partial charges (in units of e) per atomic number
CHARGES = {1: 0.3, 6: -0.2, 7: -0.4, 8: -0.5}


def dipole(atoms) -> np.ndarray:
    """Dipole of the fixed partial charges about the mean position (e * angstrom)."""
    charges = np.array([CHARGES[z] for z in atoms.numbers])
    return charges @ (atoms.positions - atoms.positions.mean(axis=0))


def make_dipole_dataset(path: str, n_structures: int = 80, seed: int = 0) -> None:
    """Write ``n_structures`` rattled molecules with their dipoles to ``path``."""
    rng = np.random.default_rng(seed)
    names = sorted(
        name
        for name in g2.names
        if set(g2[name].get_chemical_symbols()) <= {"H", "C", "N", "O"}
        and 3 <= len(g2[name]) <= 12
    )
    frames = []
    for _ in range(n_structures):
        atoms = molecule(names[rng.integers(len(names))])
        atoms.positions += rng.normal(scale=0.1, size=atoms.positions.shape)
        atoms.info["REF_dipole"] = dipole(atoms)
        frames.append(atoms)
    ase.io.write(path, frames, format="extxyz")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--structures", type=int, default=80)
    parser.add_argument("--output", default="dipoles.xyz")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    make_dipole_dataset(args.output, args.structures, args.seed)
