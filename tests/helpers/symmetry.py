"""Helpers for the symmetry tests: targets of every kind, structures, O(3) references.

The reference Wigner matrices come from metatomic (``metatomic.torch.o3``, computed by
the ``wigners`` package in metatensor's real spherical harmonics convention), and are
checked against e3nn's (``o3.Irrep.D_from_matrix``) in ``test_symmetry.py``.
"""

from typing import Dict, List

import ase
import numpy as np
import torch
from ase.build import molecule
from metatomic.torch import ModelOutput
from metatomic.torch.o3 import O3Transformations
from metatrain.utils.data import DatasetInfo
from metatrain.utils.data.target_info import (
    get_energy_target_info,
    get_generic_target_info,
)

from metatrain_mace.mace_import import o3


# every irrep the node features of HYPERS carry, with both parities up to l = 2
HYPERS = {
    "r_max": 3.5,
    "num_radial_basis": 4,
    "max_ell": 2,
    "num_interactions": 3,
    "hidden_irreps": "2x0e + 2x0o + 2x1o + 2x1e + 2x2e + 2x2o",
    "correlation": 2,
    "MLP_irreps": "4x0e",
    "radial_MLP": [8],
    "head_hidden_sizes": [8],
}

SPHERICAL_IRREPS = [
    {"o3_lambda": 0, "o3_sigma": 1},
    {"o3_lambda": 0, "o3_sigma": -1},
    {"o3_lambda": 1, "o3_sigma": 1},
    {"o3_lambda": 1, "o3_sigma": -1},
    {"o3_lambda": 2, "o3_sigma": 1},
    {"o3_lambda": 2, "o3_sigma": -1},
]


def _generic(name: str, kind, n: int, sample_kind: str, unit: str = ""):
    return get_generic_target_info(
        name,
        {
            "quantity": "",
            "unit": unit,
            "type": kind,
            "num_subtargets": n,
            "sample_kind": sample_kind,
        },
    )


def all_kinds_dataset_info() -> DatasetInfo:
    """One target of every kind the issue lists, H/C/O structures."""
    targets = {
        "energy": get_energy_target_info(
            "energy", {"unit": "eV"}, add_position_gradients=True
        ),
        # a second energy-like target, on an MLP head instead of MACE's readout
        "mtt::energy2": get_energy_target_info(
            "mtt::energy2",
            {"unit": "eV"},
            add_position_gradients=True,
            add_strain_gradients=True,
        ),
        "mtt::scalars": _generic("mtt::scalars", "scalar", 5, "system"),
        "mtt::atom_scalars": _generic("mtt::atom_scalars", "scalar", 5, "atom"),
        "mtt::spherical": _generic(
            "mtt::spherical", {"spherical": {"irreps": SPHERICAL_IRREPS}}, 2, "atom"
        ),
        "mtt::pseudo": _generic(
            "mtt::pseudo",
            {"spherical": {"irreps": [{"o3_lambda": 1, "o3_sigma": -1}]}},
            3,
            "system",
        ),
        "mtt::dipole": _generic(
            "mtt::dipole", {"cartesian": {"rank": 1}}, 1, "system", unit="e*angstrom"
        ),
        "mtt::displacement": _generic(
            "mtt::displacement", {"cartesian": {"rank": 1}}, 2, "atom", unit="angstrom"
        ),
    }
    return DatasetInfo(length_unit="angstrom", atomic_types=[1, 6, 8], targets=targets)


def structures(seed: int = 0) -> List[ase.Atoms]:
    """A rattled molecule and a periodic (triclinic) cell of H, C and O."""
    rng = np.random.default_rng(seed)
    ethanol = molecule("CH3CH2OH")
    ethanol.positions += rng.normal(scale=0.1, size=ethanol.positions.shape)
    cell = np.array([[4.2, 0.3, 0.0], [0.5, 4.0, 0.2], [-0.3, 0.4, 4.4]])
    fractional = rng.random((8, 3))
    periodic = ase.Atoms(
        numbers=rng.choice([1, 6, 8], size=8),
        scaled_positions=fractional,
        cell=cell,
        pbc=True,
    )
    return [ethanol, periodic]


def transformed(atoms: ase.Atoms, matrix: np.ndarray) -> ase.Atoms:
    """``atoms`` with positions and cell vectors mapped by the 3x3 ``matrix``."""
    new = atoms.copy()
    new.positions = atoms.positions @ matrix.T
    if atoms.pbc.any():
        new.set_cell(np.asarray(atoms.cell) @ matrix.T, scale_atoms=False)
    return new


def wigner(matrix: torch.Tensor, o3_lambda: int, o3_sigma: int) -> torch.Tensor:
    """How a block ``(o3_lambda, o3_sigma)`` transforms under the O(3) ``matrix``.

    metatensor convention: proper tensors (``o3_sigma = 1``) pick up ``(-1)^l``
    under inversion, pseudotensors ``(-1)^(l+1)``.
    """
    matrix = matrix.to(torch.float64)
    improper = bool(torch.det(matrix) < 0)
    proper = -matrix if improper else matrix
    D = O3Transformations(proper.unsqueeze(0), o3_lambda).wigner_D_matrices(o3_lambda)
    D = D[0].to(torch.float64)
    if improper:
        D = D * (o3_sigma * (-1) ** o3_lambda)
    return D


def expected_transform(
    values: torch.Tensor, key: Dict[str, int], kind: str, matrix: torch.Tensor
) -> torch.Tensor:
    """Block ``values`` (samples, components..., properties) mapped by ``matrix``.

    ``kind`` is ``"scalar"``, ``"cartesian"`` (rotates with the matrix itself on
    every component axis: ``Q v`` or ``Q T Q^T``) or ``"spherical"`` (Wigner
    matrices of the block's key, one per component axis for ``o3_lambda_1`` /
    ``o3_lambda_2`` keys).
    """
    values = values.to(torch.float64)
    matrix = matrix.to(torch.float64)
    if kind == "scalar":
        return values
    if kind == "cartesian":
        if values.dim() == 4:
            return torch.einsum("ia,jb,sabp->sijp", matrix, matrix, values)
        return torch.einsum("ij,sjp->sip", matrix, values)
    if "o3_lambda_1" in key:
        first = wigner(matrix, key["o3_lambda_1"], key["o3_sigma_1"])
        second = wigner(matrix, key["o3_lambda_2"], key["o3_sigma_2"])
        return torch.einsum("ia,jb,sabp->sijp", first, second, values)
    D = wigner(matrix, key["o3_lambda"], key["o3_sigma"])
    return torch.einsum("ij,sjp->sip", D, values)


def evaluate(calculator, atoms, kinds, sample_kind) -> Dict[str, List[tuple]]:
    """``(key, values)`` of every block of every output; targets are requested with
    their own sample kind, features with ``sample_kind``."""
    outputs = {
        name: ModelOutput(sample_kind=sample_kind if kind is None else kind)
        for name, (_, kind) in kinds.items()
    }
    result = calculator.run_model(atoms, outputs)
    values = {}
    for name, tensor in result.items():
        keys = [
            {n: int(v) for n, v in zip(key.names, key.values, strict=True)}
            for key in tensor.keys
        ]
        values[name] = [
            (key, block.values.detach().to(torch.float64))
            for key, block in zip(keys, tensor.blocks(), strict=True)
        ]
    return values


def as_3d(values: torch.Tensor) -> torch.Tensor:
    """(samples, components..., properties) with exactly one component axis."""
    if values.dim() == 2:
        return values.unsqueeze(1)
    return values


def o3_matrices(seed: int) -> List[torch.Tensor]:
    """A random rotation, another one times the inversion, and the inversion.

    Drawn in float64: a float32 rotation matrix is orthogonal to 1e-7 only.
    """
    torch.manual_seed(seed)
    rotations = [o3.rand_matrix(dtype=torch.float64) for _ in range(2)]
    return [rotations[0], -rotations[1], -torch.eye(3, dtype=torch.float64)]
