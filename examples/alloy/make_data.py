"""Make a small periodic Cu-Au alloy dataset labelled with ASE's EMT calculator.

Energies, forces and stresses of rattled and strained fcc supercells with random
Cu/Au occupations; written as extended XYZ (keys ``energy``, ``forces``, ``stress``
under ``REF_*`` names so that ASE does not mistake them for calculator results).

    python make_data.py [--structures 60] [--output alloy.xyz] [--seed 0]
"""

import argparse

import ase.io
import numpy as np
from ase.build import bulk
from ase.calculators.emt import EMT


def make_alloy_dataset(path: str, n_structures: int = 60, seed: int = 0) -> None:
    """Write ``n_structures`` labelled CuAu cells of 8 atoms to ``path``."""
    rng = np.random.default_rng(seed)
    frames = []
    for _ in range(n_structures):
        atoms = bulk("Cu", "fcc", a=3.75, cubic=True).repeat((2, 1, 1))
        gold = rng.random(len(atoms)) < rng.uniform(0.2, 0.8)
        atoms.numbers[gold] = 79
        strain = np.eye(3) + rng.normal(scale=0.02, size=(3, 3))
        atoms.set_cell(atoms.cell @ strain, scale_atoms=True)
        atoms.positions += rng.normal(scale=0.08, size=atoms.positions.shape)
        atoms.calc = EMT()
        energy = atoms.get_potential_energy()
        forces = atoms.get_forces()
        stress = atoms.get_stress(voigt=False)
        atoms.calc = None
        atoms.info["REF_energy"] = energy
        atoms.info["REF_stress"] = stress
        atoms.arrays["REF_forces"] = forces
        frames.append(atoms)
    ase.io.write(path, frames, format="extxyz")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--structures", type=int, default=60)
    parser.add_argument("--output", default="alloy.xyz")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    make_alloy_dataset(args.output, args.structures, args.seed)
    print(f"wrote {args.structures} structures to {args.output}")
