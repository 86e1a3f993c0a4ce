"""A small dataset with one target of every kind, from physical formulas and EMT.

H/C/O molecules of ASE's g2 collection, rattled, each in a periodic box large enough
that no periodic image is within the model's cutoff (so stresses are defined and the
per-structure formulas below need no images):

- ``energy``: EMT energy, forces and stress;
- ``mtt::scalars``: five invariants per structure;
- ``mtt::atom_scalars``: five radial densities per atom;
- ``mtt::dipole``: dipole of fixed partial charges (a Cartesian vector per structure);
- ``mtt::displacement``: a smooth per-atom vector (Cartesian vector per atom);
- ``mtt::spherical``: per-atom l = 0, 1, 2 densities (three spherical blocks), written
  as a metatensor file since metatrain's ASE reader takes one irrep only.
"""

from pathlib import Path
from typing import Dict

import ase
import ase.io
import metatensor.torch as mts
import numpy as np
import torch
from ase.build import molecule
from ase.calculators.emt import EMT
from ase.collections import g2
from metatensor.torch import Labels, TensorBlock, TensorMap

from metatrain_mace.mace_import import o3


CHARGES = {1: 0.3, 6: -0.2, 8: -0.5}
CUTOFF = 3.5
SPHERICAL_IRREPS = [
    {"o3_lambda": 0, "o3_sigma": 1},
    {"o3_lambda": 1, "o3_sigma": 1},
    {"o3_lambda": 2, "o3_sigma": 1},
]


def pair_vectors(atoms: ase.Atoms) -> np.ndarray:
    """``r_j - r_i`` for every pair (no periodic images), shape ``(n, n, 3)``."""
    return atoms.positions[None, :, :] - atoms.positions[:, None, :]


def weights(distances: np.ndarray) -> np.ndarray:
    """Smooth pair weights ``exp(-r) (1 - r / cutoff)^2``, zero beyond the cutoff."""
    inside = (distances > 0) & (distances < CUTOFF)
    safe = np.where(inside, distances, CUTOFF)
    return np.where(inside, np.exp(-safe) * (1 - safe / CUTOFF) ** 2, 0.0)


def spherical_densities(atoms: ase.Atoms) -> Dict[int, np.ndarray]:
    """Per-atom ``sum_j w(r_ij) Y_lm(r_ij)`` in metatensor's real harmonics.

    e3nn's harmonics evaluated on (y, z, x) follow metatensor's convention (m = -l..l,
    z polar axis), see ``test_symmetry.py``.
    """
    vectors = pair_vectors(atoms)
    distances = np.linalg.norm(vectors, axis=-1)
    w = weights(distances)
    flat = torch.from_numpy(vectors.reshape(-1, 3)[:, [1, 2, 0]])
    result = {}
    for ell in range(3):
        ylm = o3.spherical_harmonics(ell, flat, normalize=True, normalization="norm")
        ylm = torch.nan_to_num(ylm).numpy().reshape(len(atoms), len(atoms), -1)
        result[ell] = np.einsum("ij,ijm->im", w, ylm)
    return result


def label(atoms: ase.Atoms) -> None:
    """Attach every target of the module documentation to ``atoms`` (in place)."""
    calculator = EMT()
    atoms.calc = calculator
    atoms.info["REF_energy"] = atoms.get_potential_energy()
    atoms.arrays["REF_forces"] = atoms.get_forces()
    atoms.info["REF_stress"] = atoms.get_stress(voigt=False)
    atoms.calc = None

    vectors = pair_vectors(atoms)
    distances = np.linalg.norm(vectors, axis=-1)
    w = weights(distances)
    charges = np.array([CHARGES[z] for z in atoms.numbers])
    centered = atoms.positions - atoms.positions.mean(axis=0)
    gyration = np.mean(np.sum(centered**2, axis=1))
    atoms.info["REF_scalars"] = np.array(
        [
            gyration,
            w.sum() / len(atoms),
            np.sum(charges**2),
            distances.max(),
            np.sum(charges[:, None] * charges[None, :] * w),
        ]
    )
    atoms.arrays["REF_atom_scalars"] = np.stack(
        [np.sum(np.exp(-distances / s) * (distances > 0), axis=1) for s in (0.5, 1, 2)]
        + [np.sum(w, axis=1), np.sum(w * charges[None, :], axis=1)],
        axis=1,
    )
    atoms.info["REF_dipole"] = charges @ centered
    atoms.arrays["REF_displacement"] = np.einsum("ij,ijx->ix", w, vectors)


def make_frames(n_structures: int = 16, seed: int = 0) -> list:
    rng = np.random.default_rng(seed)
    names = sorted(
        name
        for name in g2.names
        if set(g2[name].get_chemical_symbols()) <= {"H", "C", "O"}
        and 3 <= len(g2[name]) <= 9
    )
    frames = []
    for i in range(n_structures):
        atoms = molecule(names[i % len(names)])
        atoms.positions += rng.normal(scale=0.08, size=atoms.positions.shape)
        extent = atoms.positions.max(axis=0) - atoms.positions.min(axis=0)
        atoms.set_cell(np.diag(extent + 2 * CUTOFF + 1.0))
        atoms.center()
        atoms.pbc = True
        label(atoms)
        frames.append(atoms)
    return frames


def spherical_tensor_map(frames: list) -> TensorMap:
    """The ``mtt::spherical`` target of all frames, one block per irrep."""
    blocks = []
    per_frame = [spherical_densities(atoms) for atoms in frames]
    samples = Labels(
        ["system", "atom"],
        torch.tensor(
            [[i, a] for i, atoms in enumerate(frames) for a in range(len(atoms))]
        ),
    )
    for irrep in SPHERICAL_IRREPS:
        ell = irrep["o3_lambda"]
        values = np.concatenate([d[ell] for d in per_frame])
        blocks.append(
            TensorBlock(
                values=torch.from_numpy(values).reshape(-1, 2 * ell + 1, 1),
                samples=samples,
                components=[
                    Labels(["o3_mu"], torch.arange(-ell, ell + 1).reshape(-1, 1))
                ],
                properties=Labels(["properties"], torch.tensor([[0]])),
            )
        )
    keys = Labels(
        ["o3_lambda", "o3_sigma"],
        torch.tensor([[i["o3_lambda"], i["o3_sigma"]] for i in SPHERICAL_IRREPS]),
    )
    return TensorMap(keys, blocks)


def write_dataset(directory: Path, n_structures: int = 16) -> Dict:
    """Write ``data.xyz`` and ``spherical.mts``; return metatrain's ``targets``."""
    frames = make_frames(n_structures)
    xyz = str(directory / "data.xyz")
    mts_path = str(directory / "spherical.mts")
    ase.io.write(xyz, frames, format="extxyz")
    mts.save(mts_path, spherical_tensor_map(frames))

    def generic(key, kind, n, sample_kind, unit=""):
        return {
            "key": key,
            "quantity": "",
            "unit": unit,
            "type": kind,
            "num_subtargets": n,
            "sample_kind": sample_kind,
        }

    return {
        "xyz": xyz,
        "targets": {
            "energy": {
                "key": "REF_energy",
                "unit": "eV",
                "forces": {"key": "REF_forces"},
                "stress": {"key": "REF_stress"},
            },
            "mtt::scalars": generic("REF_scalars", "scalar", 5, "system"),
            "mtt::atom_scalars": generic("REF_atom_scalars", "scalar", 5, "atom"),
            "mtt::dipole": generic(
                "REF_dipole", {"cartesian": {"rank": 1}}, 1, "system", "e*angstrom"
            ),
            "mtt::displacement": generic(
                "REF_displacement", {"cartesian": {"rank": 1}}, 1, "atom", "angstrom"
            ),
            "mtt::spherical": {
                **generic(
                    "spherical",
                    {"spherical": {"irreps": SPHERICAL_IRREPS}},
                    1,
                    "atom",
                ),
                "read_from": mts_path,
            },
        },
    }
