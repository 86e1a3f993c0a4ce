"""Per-target heads on the MACE node features.

Invariant (scalar) targets get a small MLP on the scalar (0e) node features of all
layers; equivariant targets (spherical blocks, Cartesian vectors) get an e3nn linear
map from all node features to the target irreps, which is exactly equivariant, or,
for irreps the features do not carry (pseudotensors, high l), a tensor product of
the features (:mod:`metatrain_mace.heads.products`).
Every head returns the values of each target block per atom, and invariant
last-layer features (for LLPR-style uncertainty): for MLP heads the input of their last
linear layer; for equivariant heads, whose last (and only) layer is linear in the node
features of the target's irreps, the rotation-invariant norm of every channel of those
features (LLPR needs one invariant feature vector per sample and target).

A :class:`ReadoutHead` is a copy of MACE's own energy readouts, for a second
energy-like target that starts from the file's head (MACE's multi-head fine-tuning,
see :mod:`metatrain_mace.finetune.strategies`).
"""

import copy
from typing import List, Tuple

import torch

from metatrain_mace.heads.features import IrrepGather
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

    def forward(self, features: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """The block's values, and no last-layer features of its own (those of
        linear blocks are the norms of the gathered node features, see
        :class:`EquivariantLinearHead`)."""
        values = self.linear(features).reshape(-1, self.num_properties, self.dim)
        values = values.transpose(1, 2).index_select(1, self.component_order)
        return values, features.new_zeros((features.shape[0], 0))


class EquivariantLinearHead(torch.nn.Module):
    """One block module per block of an equivariant target: an
    :class:`EquivariantLinearBlock` for irreps the node features carry, a
    :class:`~metatrain_mace.heads.products.ProductBlock` for the others.

    :param blocks: the block modules, one per target block; each returns the
        block's values and its own last-layer features (none for linear blocks).
    :param gathers: the node features of every distinct irrep of the linear
        blocks, whose per-channel norms are their (invariant) last-layer features.
    """

    def __init__(self, blocks: List[torch.nn.Module], gathers: List[IrrepGather]):
        super().__init__()
        self.blocks = torch.nn.ModuleList(blocks)
        self.gathers = torch.nn.ModuleList(gathers)
        self.last_layer_size = sum(gather.count for gather in gathers) + sum(
            getattr(block, "last_layer_size", 0) for block in blocks
        )

    def forward(
        self, features: torch.Tensor, scalar_features: torch.Tensor
    ) -> Tuple[List[torch.Tensor], torch.Tensor]:
        values: List[torch.Tensor] = []
        invariants: List[torch.Tensor] = []
        for gather in self.gathers:
            invariants.append(torch.linalg.vector_norm(gather(features), dim=1))
        for block in self.blocks:
            block_values, block_invariants = block(features)
            values.append(block_values)
            invariants.append(block_invariants)
        return values, torch.cat(invariants, dim=-1)


def readout_last_layer_size(
    readouts: torch.nn.ModuleList, layer_scalars: List[int]
) -> int:
    """Size of the last-layer features of MACE's readouts: the hidden layer of a
    non-linear readout, the scalar features of the layer of a linear one."""
    size = 0
    for i, readout in enumerate(readouts):
        if hasattr(readout, "linear_1"):
            size += o3.Irreps(str(readout.linear_1.irreps_out)).dim
        else:
            layer = len(layer_scalars) - 1 if len(readouts) == 1 else i
            size += layer_scalars[layer]
    return size


class ReadoutHead(torch.nn.Module):
    """A copy of MACE's per-layer energy readouts, for another energy-like target.

    Its weights start as those of ``readouts`` (the head ``head_index`` of a
    multi-head file), so that the new target starts from the predictions of the
    file's head and then trains on its own data, on the shared trunk.

    :param layer_dims: width of the node features of every layer, to split the
        concatenated features the heads receive.
    :param layer_scalars: number of scalar (0e) channels of every layer.
    """

    def __init__(
        self,
        readouts: torch.nn.ModuleList,
        layer_dims: List[int],
        layer_scalars: List[int],
        head_index: int,
    ):
        super().__init__()
        self.readouts = copy.deepcopy(readouts)
        self.layer_dims = layer_dims
        self.layer_scalars = layer_scalars
        self.head_index = head_index
        self.last_layer_size = readout_last_layer_size(readouts, layer_scalars)

    def forward(
        self, features: torch.Tensor, scalar_features: torch.Tensor
    ) -> Tuple[List[torch.Tensor], torch.Tensor]:
        layers = torch.split(features, self.layer_dims, dim=-1)
        n_atoms = features.shape[0]
        node_heads = torch.full(
            (n_atoms,), self.head_index, dtype=torch.int64, device=features.device
        )
        energy = features.new_zeros((n_atoms,))
        last_layer: List[torch.Tensor] = []
        n_readouts = len(self.readouts)
        for i, readout in enumerate(self.readouts):
            layer = len(layers) - 1 if n_readouts == 1 else i
            energy = energy + readout(layers[layer], node_heads)[:, self.head_index]
            if hasattr(readout, "linear_1"):
                last_layer.append(
                    readout.non_linearity(readout.linear_1(layers[layer]))
                )
            else:
                last_layer.append(layers[layer][:, : self.layer_scalars[layer]])
        return [energy.unsqueeze(-1)], torch.cat(last_layer, dim=-1)
