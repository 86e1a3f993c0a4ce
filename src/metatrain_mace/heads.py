"""Per-target heads on the MACE node features.

Invariant (scalar) targets get a small MLP on the scalar (0e) node features of all
layers; equivariant targets (spherical blocks, Cartesian vectors) get an e3nn linear
map from all node features to the target irreps, which is exactly equivariant.
Every head returns the values of each target block per atom, and invariant
last-layer features (for LLPR-style uncertainty): for MLP heads the input of their last
linear layer; for equivariant heads, whose last (and only) layer is linear in the node
features of the target's irreps, the rotation-invariant norm of every channel of those
features (LLPR needs one invariant feature vector per sample and target).
"""

from typing import List, Tuple

import torch

from metatrain_mace.features import IrrepGather
from metatrain_mace.mace_import import o3


def irrep_of_block(o3_lambda: int, o3_sigma: int) -> o3.Irrep:
    """The e3nn irrep of a metatensor spherical block: parity ``sigma * (-1)^l``."""
    parity = o3_sigma * (-1) ** o3_lambda
    return o3.Irrep(o3_lambda, parity)


class MLPHead(torch.nn.Module):
    """SiLU MLP from scalar node features to ``num_properties`` invariant values."""

    def __init__(self, in_features: int, hidden_sizes: List[int], num_properties: int):
        super().__init__()
        layers: List[torch.nn.Module] = []
        previous = in_features
        for size in hidden_sizes:
            layers.append(torch.nn.Linear(previous, size))
            layers.append(torch.nn.SiLU())
            previous = size
        self.hidden = torch.nn.Sequential(*layers)
        self.last = torch.nn.Linear(previous, num_properties)
        self.last_layer_size = previous

    def forward(
        self, features: torch.Tensor, scalar_features: torch.Tensor
    ) -> Tuple[List[torch.Tensor], torch.Tensor]:
        hidden = self.hidden(scalar_features)
        return [self.last(hidden)], hidden


class EquivariantLinearBlock(torch.nn.Module):
    """Linear map from node features to one ``(l, parity)`` block of a target."""

    def __init__(
        self,
        irreps_in: o3.Irreps,
        irrep: o3.Irrep,
        num_properties: int,
        cartesian: bool,
    ):
        super().__init__()
        self.linear = o3.Linear(irreps_in, o3.Irreps([(num_properties, irrep)]))
        self.num_properties = num_properties
        self.dim = irrep.dim
        # e3nn's l=1 components, in our input convention, come as (y, z, x); Cartesian
        # vectors are stored as (x, y, z)
        order = [2, 0, 1] if cartesian else list(range(irrep.dim))
        self.register_buffer("component_order", torch.tensor(order), persistent=False)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        values = self.linear(features).reshape(-1, self.num_properties, self.dim)
        return values.transpose(1, 2).index_select(1, self.component_order)


class EquivariantLinearHead(torch.nn.Module):
    """One :class:`EquivariantLinearBlock` per block of an equivariant target.

    :param blocks: the linear maps, one per target block.
    :param gathers: the node features of every distinct irrep of the target, whose
        per-channel norms are the (invariant) last-layer features.
    """

    def __init__(
        self, blocks: List[EquivariantLinearBlock], gathers: List[IrrepGather]
    ):
        super().__init__()
        self.blocks = torch.nn.ModuleList(blocks)
        self.gathers = torch.nn.ModuleList(gathers)
        self.last_layer_size = sum(gather.count for gather in gathers)

    def forward(
        self, features: torch.Tensor, scalar_features: torch.Tensor
    ) -> Tuple[List[torch.Tensor], torch.Tensor]:
        values: List[torch.Tensor] = []
        for block in self.blocks:
            values.append(block(features))
        norms: List[torch.Tensor] = []
        for gather in self.gathers:
            norms.append(torch.linalg.vector_norm(gather(features), dim=1))
        return values, torch.cat(norms, dim=-1)
