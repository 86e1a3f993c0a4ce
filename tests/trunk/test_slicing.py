"""The split-once rewrite of e3nn tensor products gives bitwise the same numbers."""

import copy
import operator
import pickle

import torch
from torch import fx

from helpers.mace_files import build_mace_model
from metatrain_mace.trunk.slicing import (
    split_column_slices,
    split_tensor_product_inputs,
)


def _column_slices(graph: fx.Graph) -> int:
    return sum(
        1
        for node in graph.nodes
        if node.op == "call_function"
        and node.target is operator.getitem
        and isinstance(node.args[1], tuple)
        and node.args[1][:1] == (slice(None),)
    )


def _slicing_module() -> fx.GraphModule:
    """2 x[:, 0:2] + sum(x[:, 4:7]) - x[:, :2] + y[:, 0:2] * y[:, 1:3]."""
    graph = fx.Graph()
    x = graph.placeholder("x")
    y = graph.placeholder("y")
    a = graph.call_function(operator.getitem, (x, (slice(None), slice(0, 2))))
    b = graph.call_function(operator.getitem, (x, (slice(None), slice(4, 7))))
    a_again = graph.call_function(operator.getitem, (x, (slice(None), slice(None, 2))))
    # overlapping slices of y must stay slices
    c = graph.call_function(operator.getitem, (y, (slice(None), slice(0, 2))))
    d = graph.call_function(operator.getitem, (y, (slice(None), slice(1, 3))))
    doubled = graph.call_function(operator.mul, (a, 2.0))
    summed = graph.call_method("sum", (b, -1), {"keepdim": True})
    out = graph.call_function(operator.add, (doubled, summed))
    out = graph.call_function(operator.sub, (out, a_again))
    overlap = graph.call_function(operator.mul, (c, d))
    out = graph.call_function(operator.add, (out, overlap))
    graph.output(out)
    return fx.GraphModule(torch.nn.Module(), graph)


def test_split_column_slices_on_a_small_graph():
    module = _slicing_module()
    x = torch.randn(5, 9, dtype=torch.float64, requires_grad=True)
    y = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    expected = module(x, y)
    expected_grads = torch.autograd.grad(expected.pow(2).sum(), [x, y])

    assert split_column_slices(module) == 1  # x only: y's slices overlap
    assert _column_slices(module.graph) == 2  # the two slices of y are left
    scripted = torch.jit.script(module)
    for candidate in (module, scripted):
        result = candidate(x, y)
        assert torch.equal(result, expected)
        grads = torch.autograd.grad(result.pow(2).sum(), [x, y])
        for grad, expected_grad in zip(grads, expected_grads, strict=True):
            assert torch.equal(grad, expected_grad)


def test_tensor_products_are_rewritten_with_identical_numbers():
    model = build_mace_model()
    reference = copy.deepcopy(model)
    # both convolutions and the second skip_tp; the first skip_tp has one path
    assert split_tensor_product_inputs(model) == 3
    assert split_tensor_product_inputs(model) == 0  # idempotent

    for original, rewritten in zip(
        reference.interactions, model.interactions, strict=True
    ):
        tp, tp_split = original.conv_tp, rewritten.conv_tp
        assert "split" in tp_split._compiled_main_left_right.code
        assert "split" not in tp._compiled_main_left_right.code
        generator = torch.Generator().manual_seed(0)
        inputs = [
            torch.randn(
                37, dim, dtype=torch.float64, generator=generator, requires_grad=True
            )
            for dim in (tp.irreps_in1.dim, tp.irreps_in2.dim, tp.weight_numel)
        ]
        results = []
        for module in (tp, tp_split):
            out = module(*inputs)
            # first and second derivatives, as in training with forces
            grads = torch.autograd.grad(out.pow(2).sum(), inputs, create_graph=True)
            second = torch.autograd.grad(sum(g.pow(2).sum() for g in grads), inputs)
            results.append([out, *grads, *second])
        for a, b in zip(*results, strict=True):
            assert torch.equal(a, b)


def test_rewritten_model_survives_pickling():
    model = build_mace_model()
    split_tensor_product_inputs(model)
    restored = pickle.loads(pickle.dumps(model))
    conv_tp = restored.interactions[1].conv_tp
    assert "split" in conv_tp._compiled_main_left_right.code
    assert split_tensor_product_inputs(restored) == 0
