"""Which irreps the MACE node features actually carry (not only which are declared).

``hidden_irreps`` declares the irreps of the node features, but MACE only fills those
it can reach: the spherical harmonics go up to ``max_ell``, the symmetric product of
order ``correlation`` couples them, and the last layer keeps the scalars only. An irrep
that no path reaches stays exactly zero (for example ``1e`` with ``max_ell: 1`` and
``correlation: 2``), and a head reading it could only ever predict zeros.

The probe runs the node features once on a small random (chiral, non-planar) cluster
with every atomic type and keeps the irreps whose values are not zero; a reachable
irrep is non-zero there for any generic weights, an unreachable one is exactly zero.
"""

from typing import Callable, List

import torch

from metatrain_mace.mace_import import o3


NodeFeatures = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], List[torch.Tensor]]


def probe_cluster(
    n_types: int, r_max: float, dtype: torch.dtype, device: torch.device
) -> tuple:
    """A fully connected random cluster: ``(node_attrs, edge_index, vectors)``."""
    n_atoms = max(7, 2 * n_types)
    generator = torch.Generator().manual_seed(20260423)
    # inside a cube of side r_max / 2, every pair is closer than r_max
    positions = torch.rand(n_atoms, 3, generator=generator, dtype=torch.float64)
    positions = (positions * 0.5 * r_max).to(dtype=dtype, device=device)
    species = torch.arange(n_atoms, device=device) % n_types
    node_attrs = torch.nn.functional.one_hot(species, n_types).to(dtype)
    sender, receiver = torch.meshgrid(
        torch.arange(n_atoms, device=device),
        torch.arange(n_atoms, device=device),
        indexing="ij",
    )
    keep = sender != receiver
    edge_index = torch.stack([sender[keep], receiver[keep]])
    vectors = positions[edge_index[1]] - positions[edge_index[0]]
    return node_attrs, edge_index, vectors


def produced_irreps(
    node_features: NodeFeatures,
    layer_irreps: List[o3.Irreps],
    n_types: int,
    r_max: float,
    dtype: torch.dtype,
    device: torch.device,
) -> List[o3.Irreps]:
    """For every layer, the declared irreps whose node features are not all zero.

    :param node_features: computes the node features of every layer from
        ``(node_attrs, edge_index, vectors)``.
    :param layer_irreps: the declared irreps of every layer's node features.
    :param n_types: number of atomic types (length of the one-hot node attributes).
    :param r_max: cutoff radius of the model.
    :return: one ``Irreps`` per layer, same order and multiplicities as declared,
        without the irreps that are identically zero.
    """
    node_attrs, edge_index, vectors = probe_cluster(n_types, r_max, dtype, device)
    with torch.no_grad():
        features = node_features(node_attrs, edge_index, vectors)
    result: List[o3.Irreps] = []
    for values, irreps in zip(features, layer_irreps, strict=True):
        scale = float(values.abs().max()) if values.numel() > 0 else 0.0
        # structural zeros are exactly 0 (the coupling coefficients vanish); keep a
        # tolerance far below any reachable value for float32 round-off
        tolerance = 1e-5 * scale
        kept = []
        for (mul, irrep), part in zip(irreps, irreps.slices(), strict=True):
            if float(values[:, part].abs().max()) > tolerance:
                kept.append((mul, irrep))
        result.append(o3.Irreps(kept))
    return result
