"""The equivariant MACE node features as a spherical TensorMap.

Layout of ``mtt::aux::mace_features``: one block per irrep that the node features of
any layer actually carry (irreps that MACE never fills are left out, see
:mod:`metatrain_mace.trunk.irreps`), keyed by ``o3_lambda`` and ``o3_sigma`` (metatensor
convention: ``o3_sigma = parity * (-1)^o3_lambda``, so ``1o`` is ``(1, 1)`` and ``1e``
is ``(1, -1)``), with one ``o3_mu`` component axis (``-l..l``, real spherical harmonics
with ``z`` as polar axis, the convention of metatensor) and properties
``["layer", "channel"]``: the MACE layer (from 0) and the channel of that irrep in the
layer. Samples are ``["system", "atom"]``, or ``["system"]`` when summed per structure.
"""

from typing import List

import torch
from metatensor.torch import Labels, TensorBlock, TensorMap

from metatrain_mace.mace_import import o3


def sigma_of_irrep(irrep: o3.Irrep) -> int:
    """metatensor's ``o3_sigma`` of an e3nn irrep: ``parity * (-1)^l``."""
    return int(irrep.p) * (-1) ** int(irrep.l)


class IrrepGather(torch.nn.Module):
    """Collects the channels of one irrep from the node features of all layers.

    The input is the node features of all layers concatenated (e3nn layout, channel
    major); the output has shape ``(atoms, 2l + 1, channels)``.
    """

    def __init__(
        self,
        layer_irreps: List[o3.Irreps],
        produced: List[o3.Irreps],
        irrep: o3.Irrep,
    ):
        super().__init__()
        columns: List[int] = []
        labels: List[List[int]] = []
        offset = 0
        for layer, (irreps, kept) in enumerate(
            zip(layer_irreps, produced, strict=True)
        ):
            kept_irreps = {ir for _, ir in kept}
            channel = 0
            for (mul, ir), part in zip(irreps, irreps.slices(), strict=True):
                if ir != irrep or ir not in kept_irreps:
                    continue
                for c in range(mul):
                    start = offset + part.start + c * ir.dim
                    columns.extend(range(start, start + ir.dim))
                    labels.append([layer, channel])
                    channel += 1
            offset += irreps.dim
        self.o3_lambda = int(irrep.l)
        self.o3_sigma = sigma_of_irrep(irrep)
        self.dim = int(irrep.dim)
        self.count = len(labels)
        self.register_buffer(
            "index", torch.tensor(columns, dtype=torch.int64), persistent=False
        )
        self.register_buffer(
            "labels",
            torch.tensor(labels, dtype=torch.int32).reshape(-1, 2),
            persistent=False,
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        values = features.index_select(1, self.index)
        return values.reshape(-1, self.count, self.dim).transpose(1, 2)


def produced_irrep_list(produced: List[o3.Irreps]) -> List[o3.Irrep]:
    """The distinct irreps of ``produced``, sorted by ``(l, o3_sigma)``."""
    irreps = {ir for layer in produced for _, ir in layer}
    return sorted(irreps, key=lambda ir: (ir.l, -sigma_of_irrep(ir)))


class SphericalFeatures(torch.nn.Module):
    """All node features as a spherical TensorMap (see the module documentation)."""

    def __init__(self, layer_irreps: List[o3.Irreps], produced: List[o3.Irreps]):
        super().__init__()
        irreps = produced_irrep_list(produced)
        self.gathers = torch.nn.ModuleList(
            [IrrepGather(layer_irreps, produced, irrep) for irrep in irreps]
        )
        keys = [[ir.l, sigma_of_irrep(ir)] for ir in irreps]
        self.register_buffer(
            "keys",
            torch.tensor(keys, dtype=torch.int32).reshape(-1, 2),
            persistent=False,
        )

    def forward(self, features: torch.Tensor, samples: Labels) -> TensorMap:
        blocks: List[TensorBlock] = []
        for gather in self.gathers:
            mu = torch.arange(
                -gather.o3_lambda,
                gather.o3_lambda + 1,
                dtype=torch.int32,
                device=features.device,
            )
            blocks.append(
                TensorBlock(
                    values=gather(features),
                    samples=samples,
                    components=[Labels(["o3_mu"], mu.reshape(-1, 1))],
                    properties=Labels(["layer", "channel"], gather.labels),
                )
            )
        keys = Labels(["o3_lambda", "o3_sigma"], self.keys)
        return TensorMap(keys, blocks)
