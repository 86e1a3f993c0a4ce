"""The MACE trunk on NVIDIA's cuEquivariance (``enable_cueq``), and back to e3nn.

mace-torch builds a cuEquivariance MACE when given a ``cueq_config``: its linears,
channel-wise tensor products and symmetric contractions become
``cuequivariance_torch`` modules (CUDA kernels on a GPU, a pure-torch fallback on the
CPU). This module builds the twin of a MACE module in the other backend, from the
constructor arguments read back from the module itself, and moves the weights
across. mace-torch's own converter assumes models made by its trainer; this one
works on every MACE this package builds or loads (plain ``MACE`` and
``ScaleShiftMACE``, one or several heads, ZBL, charge/spin embeddings).

Weights map one to one, except the symmetric contractions: e3nn keeps one weight
tensor per output irrep and correlation order (``weights_max``, ``weights.0``, ...),
cuEquivariance one tensor with all of them concatenated along the path axis.
"""

import logging
from typing import Dict, List

import numpy as np
import torch

from metatrain_mace.mace_import import o3
from metatrain_mace.trunk.backend import (
    cueq_config,
    float64_default,
    is_cueq,
    require_cueq,
)
from metatrain_mace.trunk.mace_args import constructor_args, reduced_cg
from metatrain_mace.trunk.scripting import quiet_torchscript


def _projection(contraction: torch.nn.Module, correlation: int) -> torch.Tensor:
    """cuEquivariance's change of basis for the reduced coupling basis."""
    import cuequivariance as cue
    from mace.tools.cg import O3_e3nn
    from mace.tools.cg_cueq_tools import symmetric_contraction_proj

    irreps_in = o3.Irreps([ir for _, ir in o3.Irreps(str(contraction.irreps_in))])
    irreps_out = o3.Irreps([ir for _, ir in o3.Irreps(str(contraction.irreps_out))])
    # mace-torch computes the coupling basis in the default dtype: in float32
    # the fitted change of basis misses by 2e-8, in float64 by 2e-16
    with float64_default():
        _, projection = symmetric_contraction_proj(
            cue.Irreps(O3_e3nn, str(irreps_in)),
            cue.Irreps(O3_e3nn, str(irreps_out)),
            list(range(1, correlation + 1)),
        )
    return torch.as_tensor(np.asarray(projection), dtype=torch.float64)


def _e3nn_weight_keys(
    e3nn_state: Dict[str, torch.Tensor],
    prefix: str,
    n_outputs: int,
    correlation: int,
    reduced: bool,
) -> List[str]:
    """Keys of the e3nn contraction weights in cuEquivariance's order: output
    irreps in order, each from the highest correlation down, without zeroed
    paths."""
    keys: List[str] = []
    for k in range(n_outputs):
        base = f"{prefix}contractions.{k}."
        suffixes = ["_max"] + [f".{i}" for i in range(correlation - 1)]
        for suffix in suffixes:
            zeroed = e3nn_state.get(
                base + "weights" + suffix.replace(".", "_") + "_zeroed"
            )
            if not reduced and zeroed is not None and bool(zeroed):
                continue
            keys.append(base + "weights" + suffix)
    return keys


def _copy_common(src: Dict[str, torch.Tensor], dst: Dict[str, torch.Tensor]) -> None:
    """Weights under the same name in both backends (linears, radial MLPs, ...):
    the same numbers, e3nn keeping them flat and cuEquivariance as ``(1, n)``.
    The symmetric contractions and backend-specific buffers are left alone."""
    for key, value in src.items():
        if "symmetric_contractions" in key or key not in dst:
            continue
        if dst[key].numel() != value.numel():
            raise ValueError(
                f"cannot move {key!r} between e3nn and cuEquivariance: "
                f"{tuple(value.shape)} for {tuple(dst[key].shape)}"
            )
        dst[key] = value.reshape(dst[key].shape)


def copy_weights(source: torch.nn.Module, target: torch.nn.Module) -> None:
    """Copy the weights of a module without symmetric contractions (a copy of
    MACE's readouts, say) into its twin in the other backend."""
    dst = target.state_dict()
    _copy_common(source.state_dict(), dst)
    target.load_state_dict(dst)


def mul_ir_order(irreps: o3.Irreps) -> torch.Tensor:
    """Column order taking features from cuEquivariance's (irrep, multiplicity)
    layout to e3nn's (multiplicity, irrep) layout, block by block."""
    order: List[int] = []
    start = 0
    for mul, irrep in irreps:
        dim = irrep.dim
        for u in range(mul):
            order.extend(start + m * mul + u for m in range(dim))
        start += mul * dim
    return torch.tensor(order, dtype=torch.int64)


def _transfer(source: torch.nn.Module, target: torch.nn.Module, reduced: bool) -> None:
    """Copy the weights of ``source`` into its twin ``target`` (other backend)."""
    src = source.state_dict()
    dst = target.state_dict()
    to_cueq = is_cueq(target)
    e3nn_state, e3nn_module = (src, source) if to_cueq else (dst, target)
    for i, product in enumerate(e3nn_module.products):
        prefix = f"products.{i}.symmetric_contractions."
        contraction = product.symmetric_contractions
        correlation = int(contraction.contractions[0].correlation)
        keys = _e3nn_weight_keys(
            e3nn_state, prefix, len(contraction.contractions), correlation, reduced
        )
        projection = None
        if reduced:
            projection = _projection(contraction, correlation)
        if to_cueq:
            joined = torch.cat([src[key] for key in keys], dim=1)
            if projection is not None:
                joined = torch.einsum(
                    "zau,ab->zbu", joined.to(torch.float64), projection
                )
            if joined.shape != dst[prefix + "weight"].shape:
                raise ValueError(
                    f"cannot move the symmetric contraction {i} to cuEquivariance: "
                    f"{tuple(joined.shape)} weights for "
                    f"{tuple(dst[prefix + 'weight'].shape)}"
                )
            dst[prefix + "weight"] = joined
        else:
            weight = src[prefix + "weight"]
            if projection is not None:
                weight = torch.einsum(
                    "zau,ab->zbu",
                    weight.to(torch.float64),
                    torch.linalg.pinv(projection),
                )
            sizes = [dst[key].shape[1] for key in keys]
            for key, part in zip(keys, torch.split(weight, sizes, 1), strict=True):
                dst[key] = part
    _copy_common(src, dst)
    target.load_state_dict(dst)
    for mine, theirs in zip(source.interactions, target.interactions, strict=True):
        theirs.avg_num_neighbors = mine.avg_num_neighbors


@quiet_torchscript()
def convert(mace: torch.nn.Module, to_cueq: bool) -> torch.nn.Module:
    """The twin of ``mace`` in the other backend (``mace`` itself when it already
    runs on the one asked for), in float64, with the same weights."""
    if is_cueq(mace) == to_cueq:
        return mace
    require_cueq()
    args = constructor_args(mace)
    reduced = reduced_cg(mace)
    args["use_reduced_cg"] = reduced
    if to_cueq:
        args["cueq_config"] = cueq_config()
    parameter = next(mace.parameters())
    with float64_default():
        twin = type(mace)(**args)
    _transfer(mace, twin, reduced)
    logging.info(
        "Moved the MACE trunk to "
        + ("cuEquivariance" if to_cueq else "e3nn")
        + f" ({sum(p.numel() for p in twin.parameters())} weights)"
    )
    return twin.to(dtype=parameter.dtype, device=parameter.device).train(mace.training)


__all__ = ["convert", "copy_weights", "mul_ir_order"]
