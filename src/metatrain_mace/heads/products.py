"""Head blocks for irreps that the MACE node features do not carry.

MACE's node features hold only the irreps that its spherical harmonics and symmetric
products reach (with ordinary hypers ``0e + 1o + 2e``); a pseudotensor target (``0o``,
``1e``, ``2o``, ``3e``) or an ``l = 3`` one cannot be a linear map of them. Products of
the features can reach them: ``1o x 1o`` holds ``1e`` (a cross product), ``1o x 2e``
holds ``3o``, and ``(1o x 1o) x 1o`` holds ``0o`` (a triple product). A
:class:`ProductBlock` maps the node features linearly to a few channels, couples them
with e3nn's tensor products (two factors, or three where two cannot reach the
target), and keeps only the paths that end in the target irrep: exactly equivariant
under rotations and inversion, like MACE's own products.

Intermediate irreps are kept to ``l <= 2 * max(l of the features)``; an irrep that no
product of at most three factors reaches within that bound is refused by
:func:`product_order`'s caller with the trunk-design message of
:mod:`metatrain_mace.heads.targets`.
"""

import contextlib
from typing import Iterator, List, Optional, Set, Tuple

import torch

from metatrain_mace.mace_import import e3nn, o3


# channels of each irrep entering the products: enough for independent factors
# (a cross product of one channel with itself is zero), small enough to stay cheap
PRODUCT_CHANNELS = 8


def _products(left: Set[o3.Irrep], right: Set[o3.Irrep], lmax: int) -> Set[o3.Irrep]:
    """Every irrep of ``a x b`` (``a`` in ``left``, ``b`` in ``right``) to ``lmax``."""
    result: Set[o3.Irrep] = set()
    for a in left:
        for b in right:
            for irrep in a * b:
                if irrep.l <= lmax:
                    result.add(irrep)
    return result


def product_order(produced: o3.Irreps, irrep: o3.Irrep) -> Optional[int]:
    """How many factors of the node features a product needs to reach ``irrep``:
    1 (a linear map suffices), 2 or 3; ``None`` when none of these reaches it."""
    carried = {ir for _, ir in produced}
    if irrep in carried:
        return 1
    if len(carried) == 0:
        return None
    lmax = 2 * max(ir.l for ir in carried)
    if irrep.l > lmax:
        return None
    second = _products(carried, carried, lmax)
    if irrep in second:
        return 2
    if irrep in _products(second, carried, lmax):
        return 3
    return None


def _factor_irreps(produced: o3.Irreps) -> o3.Irreps:
    """``PRODUCT_CHANNELS`` channels of every non-scalar irrep the features carry,
    and of ``0e`` (which lets a two-factor product pass one factor through)."""
    carried = sorted({ir for _, ir in produced}, key=lambda ir: (ir.l, -ir.p))
    return o3.Irreps([(PRODUCT_CHANNELS, ir) for ir in carried])


def _middle_irreps(factor: o3.Irreps, target: o3.Irrep) -> o3.Irreps:
    """Irreps of the first product of a three-factor block: those whose product
    with a factor irrep reaches ``target``."""
    lmax = 2 * max(ir.l for _, ir in factor)
    carried = {ir for _, ir in factor}
    middle = [
        ir
        for ir in sorted(_products(carried, carried, lmax), key=lambda i: (i.l, -i.p))
        if any(target in ir * other for other in carried)
    ]
    return o3.Irreps([(PRODUCT_CHANNELS, ir) for ir in middle])


@contextlib.contextmanager
def unscripted_codegen() -> Iterator[None]:
    """Build e3nn's tensor products without scripting their generated code (5x
    faster to build); the export compiles them with the rest of the model."""
    previous = e3nn.get_optimization_defaults()["jit_script_fx"]
    e3nn.set_optimization_defaults(jit_script_fx=False)
    try:
        yield
    finally:
        e3nn.set_optimization_defaults(jit_script_fx=previous)


class ProductBlock(torch.nn.Module):
    """One ``(l, parity)`` block of a target, from products of the node features.

    The features are projected to ``PRODUCT_CHANNELS`` channels per carried irrep,
    by one linear map per factor (distinct factors make antisymmetric couplings such
    as the cross product non-zero), and coupled with e3nn's fully connected tensor
    products into ``num_properties`` copies of ``irrep``.

    The invariant last-layer features are the norms of every channel of the first
    factor (rotation- and inversion-invariant).
    """

    def __init__(
        self,
        irreps_in: o3.Irreps,
        produced: o3.Irreps,
        irrep: o3.Irrep,
        num_properties: int,
        order: int,
    ):
        super().__init__()
        if order not in (2, 3):
            raise ValueError(f"a product block has 2 or 3 factors, not {order}")
        factor = _factor_irreps(produced)
        target = o3.Irreps([(num_properties, irrep)])
        self.left = o3.Linear(irreps_in, factor)
        self.right = o3.Linear(irreps_in, factor)
        with unscripted_codegen():
            if order == 2:
                self.first = o3.FullyConnectedTensorProduct(factor, factor, target)
                self.third = None
                self.second = None
            else:
                middle = _middle_irreps(factor, irrep)
                self.first = o3.FullyConnectedTensorProduct(factor, factor, middle)
                self.third = o3.Linear(irreps_in, factor)
                self.second = o3.FullyConnectedTensorProduct(middle, factor, target)
        # the last product starts at zero: an untrained block predicts zeros rather
        # than a product of two or three O(1) features, whose size (and gradient)
        # would otherwise swamp the other targets sharing the trunk
        last = self.first if self.second is None else self.second
        with torch.no_grad():
            last.weight.zero_()
        self.num_properties = num_properties
        self.dim = int(irrep.dim)
        # per-channel norms of the first factor: start, end, dimension of each irrep
        self.factor_slices: List[Tuple[int, int, int]] = [
            (part.start, part.stop, ir.dim)
            for (_, ir), part in zip(factor, factor.slices(), strict=True)
        ]
        self.last_layer_size = factor.num_irreps

    def forward(self, features: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        left = self.left(features)
        values = self.first(left, self.right(features))
        second = self.second
        third = self.third
        if second is not None and third is not None:
            values = second(values, third(features))
        values = values.reshape(-1, self.num_properties, self.dim).transpose(1, 2)
        norms: List[torch.Tensor] = []
        for start, stop, dim in self.factor_slices:
            channels = left[:, start:stop].reshape(left.shape[0], -1, dim)
            norms.append(torch.linalg.vector_norm(channels, dim=-1))
        return values, torch.cat(norms, dim=-1)
