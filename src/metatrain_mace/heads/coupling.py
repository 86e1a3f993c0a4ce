"""Rank-2 target blocks, assembled from their irreducible parts.

A block that transforms as the product of two irreps ``a x b`` (metatrain's
spherical targets with ``product: cartesian``, keys ``o3_lambda_1``/``o3_lambda_2``,
and Cartesian rank-2 tensors such as polarizabilities, which are ``1o x 1o``) is a
sum of irreducible parts ``L = |l_a - l_b| .. l_a + l_b`` of parity ``p_a p_b``: for
a 3x3 tensor, its trace (``0e``), antisymmetric part (``1e``) and symmetric
traceless part (``2e``). Each part is predicted by an equivariant block (linear in
the node features or a tensor product of them, see
:mod:`metatrain_mace.heads.products`),
and the parts are coupled back with the Clebsch-Gordan (Wigner 3j) coefficients:
exactly equivariant, ``T -> D_a T D_b^T`` (``R T R^T`` for Cartesian tensors).
"""

import math
from typing import List, Tuple

import torch

from metatrain_mace.mace_import import o3


def coupled_parts(first: o3.Irrep, second: o3.Irrep) -> List[o3.Irrep]:
    """The irreducible parts of ``first x second``, by increasing ``l``."""
    return [ir for _, ir in o3.Irreps(first * second).sort().irreps]


def coupling_matrix(first: o3.Irrep, second: o3.Irrep) -> torch.Tensor:
    """``(d_a * d_b, sum of the parts' dimensions)``, orthonormal columns: the
    tensor ``T[m_a, m_b]`` of the parts ``y_L[M]`` is ``W @ concat(y_L)``."""
    columns: List[torch.Tensor] = []
    for part in coupled_parts(first, second):
        cg = o3.wigner_3j(first.l, second.l, part.l, dtype=torch.float64)
        columns.append(math.sqrt(part.dim) * cg.reshape(first.dim * second.dim, -1))
    return torch.cat(columns, dim=1)


class CoupledBlock(torch.nn.Module):
    """One ``a x b`` block of a target from one equivariant block per part.

    :param parts: blocks predicting each part of :func:`coupled_parts` (in that
        order), each returning ``(values (atoms, 2L + 1, properties), invariants)``.
    :param cartesian: the block is a Cartesian tensor ``(x, y, z) x (x, y, z)``
        (``first`` and ``second`` are then ``1o``).
    """

    def __init__(
        self,
        parts: List[torch.nn.Module],
        first: o3.Irrep,
        second: o3.Irrep,
        num_properties: int,
        cartesian: bool,
    ):
        super().__init__()
        self.parts = torch.nn.ModuleList(parts)
        self.register_buffer(
            "coupling", coupling_matrix(first, second), persistent=False
        )
        self.first_dim = int(first.dim)
        self.second_dim = int(second.dim)
        self.num_properties = num_properties
        # e3nn's l = 1 components come as (y, z, x) in our input convention
        order = [2, 0, 1] if cartesian else list(range(first.dim))
        self.register_buffer("component_order", torch.tensor(order), persistent=False)
        self.cartesian = cartesian
        self.last_layer_size = sum(getattr(p, "last_layer_size", 0) for p in parts)

    def forward(self, features: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        values: List[torch.Tensor] = []
        invariants: List[torch.Tensor] = []
        for part in self.parts:
            part_values, part_invariants = part(features)
            values.append(part_values)
            invariants.append(part_invariants)
        irreducible = torch.cat(values, dim=1)
        coupling = self.coupling.to(irreducible.dtype)
        tensor = torch.einsum("ij,njp->nip", coupling, irreducible).reshape(
            -1, self.first_dim, self.second_dim, self.num_properties
        )
        if self.cartesian:
            tensor = tensor.index_select(1, self.component_order)
            tensor = tensor.index_select(2, self.component_order)
        return tensor, torch.cat(invariants, dim=-1)
