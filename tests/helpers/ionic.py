"""Charged particles whose energy has a Coulomb part at every distance.

A short-range model sees its neighbours within ``r_max`` only; the Coulomb energy
of these structures depends on every pair. Cations (Na, charge +Q) and anions (Cl,
charge -Q) are placed at random (no two closer than ``MIN_DISTANCE``), in periodic
cubic cells and in clusters; the energy is a Born-Mayer repulsion (short range)
plus the Coulomb energy (Ewald sums from torch-pme for periodic cells, the direct
sum for clusters), and the forces are its exact gradients.
"""

from pathlib import Path
from typing import List

import ase
import ase.io
import numpy as np
import torch


CHARGES = {11: 0.4, 17: -0.4}
COULOMB = 14.399645  # e^2 / (4 pi epsilon_0) in eV A
MIN_DISTANCE = 2.2
BOX = 8.0
# Born-Mayer repulsion A exp(-r / rho) between all pairs closer than 4 A
REPULSION, RHO = 300.0, 0.3

# the targets section of metatrain options for the files of make_ionic
IONIC_TARGETS = {
    "energy": {"key": "REF_energy", "unit": "eV", "forces": {"key": "REF_forces"}}
}


def _positions(rng: np.random.Generator, n_atoms: int, periodic: bool) -> np.ndarray:
    positions: List[np.ndarray] = []
    while len(positions) < n_atoms:
        trial = rng.uniform(0.0, BOX, size=3)
        ok = True
        for other in positions:
            delta = trial - other
            if periodic:
                delta -= BOX * np.round(delta / BOX)
            if np.linalg.norm(delta) < MIN_DISTANCE:
                ok = False
                break
        if ok:
            positions.append(trial)
    return np.array(positions)


def _pairs(positions: torch.Tensor, periodic: bool, cutoff: float):
    """Every ordered pair (i, j, periodic image of j) closer than ``cutoff``: a
    full neighbour list, each pair twice."""
    shifts = [(0, 0, 0)]
    if periodic:
        grid = range(-int(np.ceil(cutoff / BOX)), int(np.ceil(cutoff / BOX)) + 1)
        shifts = [(a, b, c) for a in grid for b in grid for c in grid]
    first, second, vectors = [], [], []
    for shift in shifts:
        offset = torch.tensor(shift, dtype=positions.dtype) * BOX
        delta = positions[None, :, :] + offset - positions[:, None, :]
        distance = torch.linalg.norm(delta, dim=-1).detach()
        close = (distance < cutoff) & (distance > 0)
        i, j = torch.nonzero(close, as_tuple=True)
        first.append(i)
        second.append(j)
        vectors.append(delta[i, j])
    return torch.cat(first), torch.cat(second), torch.cat(vectors)


def energy_and_forces(atoms: ase.Atoms) -> tuple:
    """Repulsion plus Coulomb energy, and forces, of ``atoms``."""
    import torchpme

    periodic = bool(atoms.pbc.all())
    positions = torch.tensor(atoms.positions, dtype=torch.float64, requires_grad=True)
    charges = torch.tensor(
        [CHARGES[int(z)] for z in atoms.numbers], dtype=torch.float64
    ).reshape(-1, 1)
    # ordered pairs (both directions): halve the sums
    i, j, vectors = _pairs(positions, periodic, cutoff=4.0)
    distances = torch.linalg.norm(vectors, dim=-1)
    energy = 0.5 * (REPULSION * torch.exp(-distances / RHO)).sum()
    if periodic:
        smearing = 1.0
        calculator = torchpme.EwaldCalculator(
            potential=torchpme.CoulombPotential(smearing=smearing),
            lr_wavelength=0.5,
            full_neighbor_list=True,
        ).to(torch.float64)
        i, j, vectors = _pairs(positions, periodic, cutoff=7.0 * smearing)
        potentials = calculator(
            charges=charges,
            cell=torch.eye(3, dtype=torch.float64) * BOX,
            positions=positions,
            neighbor_indices=torch.stack([i, j], dim=1),
            neighbor_distances=torch.linalg.norm(vectors, dim=-1),
        )
    else:
        all_i, all_j, all_vectors = _pairs(positions, False, cutoff=1e9)
        inverse = 1.0 / torch.linalg.norm(all_vectors, dim=-1)
        potentials = torch.zeros_like(charges).index_add(
            0, all_i, (charges[all_j, 0] * inverse).reshape(-1, 1)
        )
    energy = energy + 0.5 * COULOMB * (charges * potentials).sum()
    (gradient,) = torch.autograd.grad(energy, positions)
    return float(energy), -gradient.numpy()


def make_ionic(path: Path, n_structures: int = 80, seed: int = 0) -> Path:
    """Half periodic cells, half clusters, of 8 cations and 8 anions."""
    rng = np.random.default_rng(seed)
    frames = []
    for index in range(n_structures):
        periodic = index % 2 == 0
        numbers = [11] * 8 + [17] * 8
        atoms = ase.Atoms(
            numbers=numbers,
            positions=_positions(rng, len(numbers), periodic),
            cell=np.eye(3) * BOX if periodic else np.zeros((3, 3)),
            pbc=periodic,
        )
        energy, forces = energy_and_forces(atoms)
        atoms.info["REF_energy"] = energy
        atoms.arrays["REF_forces"] = forces
        frames.append(atoms)
    ase.io.write(path, frames, format="extxyz")
    return path
