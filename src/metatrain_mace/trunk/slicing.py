"""Split the inputs of e3nn tensor products once, instead of slicing them per path.

e3nn generates the code of every tensor product: for each path it takes a column
slice ``x[:, a:b]`` of the inputs ``x1``, ``x2`` and of the per-edge weights. The
gradient of each slice is a zero-filled tensor of the *whole* input with the slice
copied in, and autograd then adds these full-size tensors up: for MACE's convolution
(inputs with one row per edge, e.g. 10 000 edges x 1 280 weights) this zero-filling
and adding is a large part of the backward pass. Inside TorchScript it is worse: each
``x[:, a:b]`` becomes two slices (the ``:`` is a slice too), and when the tensor
product is inlined into a larger model these are no longer merged, so every path
pays for two full-size gradients.

:func:`split_tensor_product_inputs` rewrites the generated code of each e3nn
``TensorProduct`` (including ``FullyConnectedTensorProduct``) so that every input is
cut once with ``torch.split``: same values, same operations afterwards, but the
backward of a split is one concatenation of the slice gradients. Forward values and
first derivatives are bitwise identical (tests/trunk/test_slicing.py).
"""

import logging
import operator
from typing import Dict, List, Optional, Tuple

import torch
from torch import fx

from metatrain_mace.trunk.backend import float64_default
from metatrain_mace.trunk.scripting import quiet_torchscript


logger = logging.getLogger(__name__)

_Range = Tuple[int, Optional[int]]


def _column_range(index: object) -> Optional[_Range]:
    """``(start, stop)`` of an index ``[:, start:stop]``, or None for other indices."""
    if not (isinstance(index, tuple) and len(index) == 2):
        return None
    rows, columns = index
    if rows != slice(None) or not isinstance(columns, slice):
        return None
    if columns.step not in (None, 1):
        return None
    start = 0 if columns.start is None else columns.start
    if not isinstance(start, int) or start < 0:
        return None
    if columns.stop is not None and (
        not isinstance(columns.stop, int) or columns.stop < start
    ):
        return None
    return (start, columns.stop)


def _chunks(ranges: List[_Range]) -> Optional[Tuple[List[int], Dict[_Range, int]]]:
    """Sizes of the chunks that cut ``[0, end)`` along the given ranges (gaps become
    unused chunks), and the chunk index of every range; None if ranges overlap."""
    sizes: List[int] = []
    chunk_of: Dict[_Range, int] = {}
    position = 0
    for start, stop in sorted(set(ranges), key=lambda r: (r[0], r[1] is None, r[1])):
        if start < position or (stop is None and start != max(r[0] for r in ranges)):
            return None
        if start > position:
            sizes.append(start - position)
        if stop is None:
            # the remainder: the last chunk, sized at run time
            chunk_of[(start, stop)] = len(sizes)
            return sizes, chunk_of
        chunk_of[(start, stop)] = len(sizes)
        sizes.append(stop - start)
        position = stop
    return sizes, chunk_of


def split_column_slices(graph_module: fx.GraphModule) -> int:
    """Replace the ``x[:, a:b]`` slices of each tensor in ``graph_module`` by one
    ``torch.split`` of that tensor. Returns the number of tensors rewritten."""
    graph = graph_module.graph
    uses: Dict[fx.Node, List[Tuple[fx.Node, _Range]]] = {}
    for node in graph.nodes:
        if node.op == "call_function" and node.target is operator.getitem:
            column_range = _column_range(node.args[1])
            if column_range is not None and isinstance(node.args[0], fx.Node):
                uses.setdefault(node.args[0], []).append((node, column_range))

    rewritten = 0
    for source, slices in uses.items():
        chunks = _chunks([r for _, r in slices])
        if chunks is None or len(slices) < 2:
            continue
        sizes, chunk_of = chunks
        end = sum(sizes)
        with graph.inserting_after(source):
            total = graph.call_method("size", (source, 1))
        with graph.inserting_after(total):
            rest = graph.call_function(operator.sub, (total, end))
        with graph.inserting_after(rest):
            parts = graph.call_method("split", (source, [*sizes, rest], 1))
        anchor = parts
        for node, column_range in slices:
            with graph.inserting_after(anchor):
                part = graph.call_function(
                    operator.getitem, (parts, chunk_of[column_range])
                )
            node.replace_all_uses_with(part)
            graph.erase_node(node)
            anchor = part
        rewritten += 1
    if rewritten:
        graph.lint()
        graph_module.recompile()
    return rewritten


@quiet_torchscript()
def split_tensor_product_inputs(module: torch.nn.Module) -> int:
    """Regenerate the code of every e3nn tensor product in ``module`` with
    :func:`split_column_slices` applied. Returns the number of tensor products changed.

    Only the ``left_right`` code (what ``TensorProduct.forward`` runs with both
    inputs) is rewritten; modules of other kinds (e.g. cuEquivariance) are left alone.
    """
    from e3nn.o3 import TensorProduct
    from e3nn.o3._tensor_product._codegen import codegen_tensor_product_left_right
    from opt_einsum_fx import jitable

    changed = 0
    for tensor_product in module.modules():
        if not isinstance(tensor_product, TensorProduct):
            continue
        if getattr(tensor_product, "_metatrain_mace_split", False):
            continue
        old = tensor_product._compiled_main_left_right
        dtypes = [
            buffer.dtype for buffer in old.buffers() if buffer.is_floating_point()
        ]
        # coupling coefficients in float64, as when the model is built, then cast to
        # the module's dtype
        with float64_default():
            graph_module = codegen_tensor_product_left_right(
                tensor_product.irreps_in1,
                tensor_product.irreps_in2,
                tensor_product.irreps_out,
                tensor_product.instructions,
                tensor_product.shared_weights,
                tensor_product._specialized_code,
                tensor_product._optimize_einsums,
            )
        if split_column_slices(graph_module) > 0:
            new = torch.jit.script(jitable(graph_module))
            if dtypes:
                new = new.to(dtypes[0])
            tensor_product._compiled_main_left_right = new
            changed += 1
        tensor_product._metatrain_mace_split = True
    logger.debug("split the inputs of %d e3nn tensor products", changed)
    return changed
