"""How much accuracy lower floating point precisions cost, block by block.

From one float64 master copy of the weights, the model is built in each lower dtype
with the same weights (rounded once). Every block of the MACE trunk (the
embeddings, each interaction, each symmetric product, each readout) is then run in
both dtypes on the *float64 reference inputs* (cast down), so that a block's row
shows the error made by that block alone, not the errors it inherits. For each
block the report gives the largest absolute and relative error of its outputs
(forward) and of the gradients with respect to its inputs for one fixed random
cotangent (backward); then the end-to-end errors of the energy per atom, the
forces and the stress of the whole model run in the lower dtype.

Relative errors are ``max |x - x_ref| / max |x_ref|`` over the block's outputs.
"""

import copy
import csv
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from metatrain_mace.trunk.graph import systems_for_model, systems_to_graph


DTYPES = {
    "float64": torch.float64,
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
FIELDS = ["dtype", "backend", "block", "quantity", "max_abs_error", "max_rel_error"]


@dataclass
class Row:
    """One line of the report; ``status`` is "ok" or why the dtype was skipped."""

    dtype: str
    backend: str
    block: str
    quantity: str
    max_abs_error: float
    max_rel_error: float
    status: str = "ok"


Tensors = Dict[str, torch.Tensor]
Outputs = Dict[str, Optional[torch.Tensor]]
Stage = Callable[[torch.nn.Module, Tensors], Outputs]


def _errors(
    mine: Sequence[torch.Tensor], reference: Sequence[torch.Tensor]
) -> Tuple[float, float]:
    """Largest absolute error, and it over the largest reference value."""
    absolute, scale = 0.0, 0.0
    for value, ref in zip(mine, reference, strict=True):
        if ref.numel() == 0:
            continue
        ref = ref.detach().to(torch.float64)
        absolute = max(
            absolute, float((value.detach().to(torch.float64) - ref).abs().max())
        )
        scale = max(scale, float(ref.abs().max()))
    return absolute, (absolute / scale if scale > 0 else 0.0)


def _stages(model: torch.nn.Module, graph: Dict) -> List[Tuple[str, List[str], Stage]]:
    """The blocks of the trunk in the order the model runs them: name, names of
    their float inputs, and how to run them on a model (``model.trunk.mace`` is the
    trunk). Each returns its outputs by name; these are the inputs of the blocks
    after it (``None`` for an output the block does not make)."""
    node_attrs = graph["node_attrs"]
    edge_index = graph["edge_index"]
    head_index = model.trunk.head_index

    def embedding(m: torch.nn.Module, x: Tensors) -> Outputs:
        vectors = x["vectors"]
        dtype = vectors.dtype
        lengths = torch.linalg.norm(vectors, dim=-1, keepdim=True)
        attrs = node_attrs.to(dtype)
        node_feats = m.trunk.mace.node_embedding(attrs)
        if hasattr(m.trunk, "conditioning"):
            # total charge and spin, embedded by the model's own weights
            node_feats = node_feats + m.trunk.conditioning(
                graph["systems"], graph["system_index"], dtype
            )
        edge_feats, cutoff = m.trunk.mace.radial_embedding(
            lengths, attrs, edge_index, m.trunk.mace.atomic_numbers
        )
        return {
            "node_feats": node_feats,
            "edge_attrs": m.trunk.mace.spherical_harmonics(vectors),
            "edge_feats": edge_feats,
            "cutoff": cutoff,
        }

    def interaction(i: int) -> Stage:
        def run(m: torch.nn.Module, x: Tensors) -> Outputs:
            message, sc = m.trunk.mace.interactions[i](
                node_attrs=node_attrs.to(x["node_feats"].dtype),
                node_feats=x["node_feats"],
                edge_attrs=x["edge_attrs"],
                edge_feats=x["edge_feats"],
                edge_index=edge_index,
                cutoff=x.get("cutoff"),
                first_layer=(i == 0),
            )
            return {"message": message, "sc": sc}

        return run

    def product(i: int) -> Stage:
        def run(m: torch.nn.Module, x: Tensors) -> Outputs:
            out = m.trunk.mace.products[i](
                node_feats=x["message"],
                sc=x.get("sc"),
                node_attrs=node_attrs.to(x["message"].dtype),
            )
            return {"node_feats": out}

        return run

    def readout(i: int) -> Stage:
        def run(m: torch.nn.Module, x: Tensors) -> Outputs:
            feats = x["node_feats"]
            if hasattr(m.trunk, "response"):
                # the readouts of mace-torch's dipole classes have no heads
                return {f"readout.{i}": m.trunk.mace.readouts[i](feats)}
            heads = torch.full((feats.shape[0],), head_index, dtype=torch.int64)
            return {f"readout.{i}": m.trunk.mace.readouts[i](feats, heads)}

        return run

    stages: List[Tuple[str, List[str], Stage]] = [("embedding", ["vectors"], embedding)]
    n_layers = len(model.trunk.mace.interactions)
    n_readouts = len(model.trunk.mace.readouts)
    for i in range(n_layers):
        stages.append(
            (
                f"interaction.{i}",
                ["node_feats", "edge_attrs", "edge_feats", "cutoff"],
                interaction(i),
            )
        )
        stages.append((f"product.{i}", ["message", "sc"], product(i)))
        # one readout per layer, or one after the last layer only
        k = i if n_readouts == n_layers else i - (n_layers - n_readouts)
        if k >= 0:
            stages.append((f"readout.{k}", ["node_feats"], readout(k)))
    return stages


def _reference_inputs(
    model: torch.nn.Module, stages, vectors: torch.Tensor
) -> List[Tensors]:
    """The float64 inputs of every stage, from one float64 pass."""
    state: Outputs = {"vectors": vectors}
    inputs: List[Tensors] = []
    with torch.no_grad():
        for _, names, run in stages:
            inputs.append(
                {k: state[k] for k in names if state.get(k) is not None}  # type: ignore
            )
            state.update(run(model, inputs[-1]))
    return inputs


def _run_block(
    model: torch.nn.Module,
    run: Stage,
    inputs: Tensors,
    dtype: torch.dtype,
    cotangents: Optional[List[torch.Tensor]],
) -> Tuple[List[torch.Tensor], List[torch.Tensor], List[torch.Tensor]]:
    """Outputs of a block, the cotangents used and the gradients of
    ``sum(cotangent * output)`` with respect to the block's inputs."""
    leaves = {k: v.detach().to(dtype).requires_grad_(True) for k, v in inputs.items()}
    outputs = [out for out in run(model, leaves).values() if out is not None]
    if cotangents is None:
        generator = torch.Generator().manual_seed(7)
        cotangents = [
            torch.randn(out.shape, generator=generator, dtype=torch.float64)
            for out in outputs
        ]
    used = [c.to(dtype) for c in cotangents]
    grads = torch.autograd.grad(outputs, list(leaves.values()), used, allow_unused=True)
    gradients = [
        torch.zeros_like(leaf) if g is None else g
        for leaf, g in zip(leaves.values(), grads, strict=True)
    ]
    return outputs, cotangents, gradients


def block_errors(
    master: torch.nn.Module,
    low: torch.nn.Module,
    graph: Dict,
    dtype: torch.dtype,
) -> List[Tuple[str, str, float, float]]:
    """Per block of the trunk: (block, "forward"/"backward", max abs error, max
    rel error) of ``low`` (the model in ``dtype``) against ``master`` (float64)."""
    stages = _stages(master, graph)
    references = _reference_inputs(master, stages, graph["vectors"])
    rows: List[Tuple[str, str, float, float]] = []
    for (name, _, run), inputs in zip(stages, references, strict=True):
        ref_out, cot, ref_grad = _run_block(master, run, inputs, torch.float64, None)
        out, _, grad = _run_block(low, run, inputs, dtype, cot)
        rows.append((name, "forward", *_errors(out, ref_out)))
        rows.append((name, "backward", *_errors(grad, ref_grad)))
    return rows


def _graph(model: torch.nn.Module, systems: list) -> Dict:
    """The graph of ``systems`` (float64) as the stages need it."""
    types, system_index, _, edge_index, vectors = systems_to_graph(
        systems, model.nl_options
    )
    return {
        "node_attrs": model.trunk.node_attrs(types, torch.float64),
        "edge_index": edge_index,
        # e3nn's (y, z, x) order, as in MetaMACE.forward
        "vectors": vectors[:, [1, 2, 0]].to(torch.float64),
        "systems": systems,
        "system_index": system_index,
    }


def _end_to_end(model: torch.nn.Module, frames: list, dtype: torch.dtype) -> Dict:
    """Energy per atom, forces and stress of ``model`` (already in ``dtype``)."""
    from metatrain.utils.data.target_info import get_energy_target_info
    from metatrain.utils.evaluate_model import evaluate_model

    target = model.mace_head_target
    info = get_energy_target_info(
        target, {"unit": "eV"}, add_position_gradients=True, add_strain_gradients=True
    )
    systems = systems_for_model(model, frames, dtype)
    block = evaluate_model(model, systems, {target: info}, is_training=False)[
        target
    ].block()
    n_atoms = torch.tensor([len(f) for f in frames], dtype=torch.float64)
    energy = block.values.detach().to(torch.float64).reshape(-1) / n_atoms
    forces = (
        -block.gradient("positions").values.detach().to(torch.float64).reshape(-1, 3)
    )
    periodic = [i for i, f in enumerate(frames) if f.pbc.all()]
    strain = block.gradient("strain").values.detach().to(torch.float64)
    stress = []
    for i in periodic:
        volume = abs(float(torch.det(systems[i].cell.detach().to(torch.float64))))
        stress.append(strain[i].reshape(3, 3) / volume)
    return {
        "energy_per_atom": energy,
        "forces": forces,
        "stress": torch.stack(stress) if stress else torch.zeros(0),
    }


def precision_report(
    model: torch.nn.Module,
    frames: list,
    dtypes: Sequence[str] = ("float32", "bfloat16"),
    backend: str = "e3nn",
) -> List[Row]:
    """The report for ``model`` (a :class:`~metatrain_mace.model.MetaMACE`, its
    float64 weights are the master copy) on the structures ``frames`` (ASE)."""
    if backend not in ("e3nn", "cueq"):
        raise ValueError(f"backend must be 'e3nn' or 'cueq', got {backend!r}")
    unknown = [d for d in dtypes if d not in DTYPES]
    if unknown:
        raise ValueError(f"unknown dtypes {unknown}: choose among {list(DTYPES)}")
    master_model = copy.deepcopy(model).to(torch.float64).eval()
    master_model.set_backend(backend == "cueq")
    graph = _graph(master_model, systems_for_model(master_model, frames, torch.float64))
    # models without an energy (a dipole model, say) get block rows only
    with_energy = master_model.mace_head_target in master_model.target_names
    reference = _end_to_end(master_model, frames, torch.float64) if with_energy else {}
    rows: List[Row] = []
    for name in dtypes:
        dtype = DTYPES[name]
        logging.info(f"precision report: {name} on {backend}")
        low_model = copy.deepcopy(master_model).to(dtype)
        try:
            found = block_errors(master_model, low_model, graph, dtype)
        except (RuntimeError, NotImplementedError, TypeError) as err:
            rows.append(_skipped(name, backend, "blocks", err))
        else:
            for block, quantity, absolute, relative in found:
                rows.append(Row(name, backend, block, quantity, absolute, relative))
        if not with_energy:
            continue
        try:
            result = _end_to_end(low_model, frames, dtype)
        except (RuntimeError, NotImplementedError, TypeError) as err:
            rows.append(_skipped(name, backend, "model", err))
            continue
        for quantity, values in result.items():
            absolute, relative = _errors([values], [reference[quantity]])
            rows.append(Row(name, backend, "model", quantity, absolute, relative))
    return rows


def _skipped(dtype: str, backend: str, what: str, err: Exception) -> Row:
    """A row saying that ``dtype`` cannot run here (float16 on some CPUs, say)."""
    reason = f"skipped: {type(err).__name__}: {str(err).splitlines()[0][:120]}"
    logging.warning(f"precision report: {dtype} ({what}) {reason}")
    return Row(dtype, backend, what, "all", float("nan"), float("nan"), reason)


def write_csv(rows: Sequence[Row], path: str) -> Path:
    """One CSV row per (dtype, backend, block, quantity)."""
    path = Path(path)
    with path.open("w", newline="") as fd:
        writer = csv.writer(fd)
        writer.writerow(FIELDS + ["status"])
        for row in rows:
            writer.writerow(
                [
                    row.dtype,
                    row.backend,
                    row.block,
                    row.quantity,
                    f"{row.max_abs_error:.6e}",
                    f"{row.max_rel_error:.6e}",
                    row.status,
                ]
            )
    return path


def plot_report(rows: Sequence[Row], path: str) -> Path:
    """Relative errors per block, forward and backward, one bar per dtype."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    kept = [r for r in rows if r.status == "ok"]
    dtypes = sorted({r.dtype for r in kept}, key=list(DTYPES).index)
    labels: List[str] = []
    for r in kept:
        label = f"{r.block} {r.quantity}"
        if label not in labels:
            labels.append(label)
    figure, axis = plt.subplots(figsize=(max(6.0, 0.45 * len(labels)), 4.5))
    width = 0.8 / max(len(dtypes), 1)
    for k, name in enumerate(dtypes):
        values = {
            f"{r.block} {r.quantity}": r.max_rel_error for r in kept if r.dtype == name
        }
        heights = [max(values.get(label, np.nan), 1e-17) for label in labels]
        axis.bar(np.arange(len(labels)) + k * width, heights, width, label=name)
    axis.set_yscale("log")
    axis.set_xticks(np.arange(len(labels)) + 0.4 - width / 2)
    axis.set_xticklabels(labels, rotation=70, ha="right", fontsize=8)
    axis.set_ylabel("max relative error vs float64")
    axis.legend(ncol=len(dtypes), loc="lower left", bbox_to_anchor=(0.0, 1.0))
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def load_for_report(
    path: str, head: Optional[str] = None, source: str = "'path'"
) -> torch.nn.Module:
    """A checkpoint (``.ckpt``), an exported model (``.pt``, written by this
    package) or a MACE model file, as a model in its own dtype.

    An exported model is rebuilt in Python from the record its export stored
    (:mod:`metatrain_mace.tools.provenance`), with the exported weights."""
    from metatrain_mace.tools.provenance import is_exported, load_trained

    exported = Path(path).is_file() and is_exported(Path(path))
    if head is not None and exported:
        raise ValueError(
            "--head selects a head of a MACE model file; an exported model "
            "already has its head"
        )
    model = load_trained(path, "have a precision report")
    if model is not None:
        # a checkpoint holds its training dtype, the report starts from float64
        return model if exported else model.to(torch.float64)
    from metatrain_mace.tools.export import mace_file_to_model

    return mace_file_to_model(
        str(path),
        head=head,
        dtype="float64",
        source=source,
        checkpoint_advice="give a checkpoint written by mtt train a '.ckpt' name.",
    )


__all__ = [
    "DTYPES",
    "Row",
    "block_errors",
    "load_for_report",
    "plot_report",
    "precision_report",
    "write_csv",
]
