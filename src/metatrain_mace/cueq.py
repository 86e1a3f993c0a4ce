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
from typing import Any, Dict, List

import numpy as np
import torch

from metatrain_mace.builder import float64_default
from metatrain_mace.mace_import import o3
from metatrain_mace.scripting import quiet_torchscript


INSTALL_HINT = "pip install 'metatrain-mace[cueq]'"


def cueq_available() -> bool:
    """Whether cuequivariance-torch can be imported."""
    try:
        import cuequivariance  # noqa: F401
        import cuequivariance_torch  # noqa: F401
    except ImportError:
        return False
    return True


def require_cueq(what: str = "'enable_cueq: true'") -> None:
    """Refuse cuEquivariance when it is not installed, naming the extra."""
    if not cueq_available():
        raise ImportError(
            f"{what} needs cuequivariance-torch, which is not installed: install it "
            f"with {INSTALL_HINT} (or set 'enable_cueq: false' to use e3nn)"
        )


def is_cueq(mace: torch.nn.Module) -> bool:
    """Whether a MACE module runs on cuEquivariance (its symmetric contractions
    are cuequivariance-torch modules)."""
    contraction = mace.products[0].symmetric_contractions
    return type(contraction).__module__.startswith("cuequivariance_torch")


def cueq_config() -> Any:
    """mace-torch's configuration for a cuEquivariance MACE: every operation on
    cuEquivariance, in its native (irrep, multiplicity) layout, with e3nn's O3
    conventions so that the weights are those of the e3nn model."""
    from mace.modules.wrapper_ops import CuEquivarianceConfig

    return CuEquivarianceConfig(
        enabled=True, layout="ir_mul", group="O3_e3nn", optimize_all=True
    )


def _irreps(value: Any) -> o3.Irreps:
    return o3.Irreps(str(value))


def _correlation(product: torch.nn.Module) -> int:
    contraction = product.symmetric_contractions
    if hasattr(contraction, "contraction_degree"):
        return int(contraction.contraction_degree)
    return int(contraction.contractions[0].correlation)


def _radial_mlp(interaction: torch.nn.Module) -> List[int]:
    weights = interaction.conv_tp_weights
    if hasattr(weights, "hs"):
        return [int(h) for h in weights.hs[1:-1]]
    return [
        int(layer.weight.shape[1])
        for name, layer in weights.named_children()
        if name.startswith("layer")
    ][:-1]


def _gate(readout: torch.nn.Module) -> Any:
    activation = getattr(readout, "non_linearity", None)
    acts = getattr(activation, "acts", None)
    if acts:
        return acts[0].f
    return None


def _radial_type(mace: torch.nn.Module) -> str:
    name = type(mace.radial_embedding.bessel_fn).__name__
    return {"BesselBasis": "bessel", "GaussianBasis": "gaussian"}.get(name, "chebyshev")


def _distance_transform(mace: torch.nn.Module) -> str:
    transform = getattr(mace.radial_embedding, "distance_transform", None)
    if transform is None:
        return "None"
    return {"AgnesiTransform": "Agnesi", "SoftTransform": "Soft"}.get(
        type(transform).__name__, "None"
    )


def constructor_args(mace: torch.nn.Module) -> Dict[str, Any]:
    """The arguments of ``type(mace)(...)`` that rebuild ``mace`` (weights aside),
    read back from the module (e3nn or cuEquivariance)."""
    heads = list(getattr(mace, "heads", None) or ["Default"])
    readout = mace.readouts[-1]
    if hasattr(readout, "hidden_irreps"):
        per_head = _irreps(readout.hidden_irreps).count(o3.Irrep("0e")) // len(heads)
        mlp_irreps = o3.Irreps(f"{max(per_head, 1)}x0e")
    else:
        mlp_irreps = o3.Irreps("16x0e")
    interactions = mace.interactions
    products = mace.products
    # with one layer only the scalars of the hidden irreps are built
    hidden = _irreps(products[0].linear.irreps_out)
    args: Dict[str, Any] = {
        "r_max": float(mace.r_max),
        "num_bessel": int(mace.radial_embedding.out_dim),
        "num_polynomial_cutoff": int(mace.radial_embedding.cutoff_fn.p),
        "max_ell": int(_irreps(mace.spherical_harmonics.irreps_out).lmax),
        "interaction_cls": type(interactions[-1]),
        "interaction_cls_first": type(interactions[0]),
        "num_interactions": int(mace.num_interactions),
        "num_elements": len(mace.atomic_numbers),
        "hidden_irreps": hidden,
        "MLP_irreps": mlp_irreps,
        "atomic_energies": mace.atomic_energies_fn.atomic_energies.detach()
        .cpu()
        .numpy(),
        "avg_num_neighbors": float(interactions[0].avg_num_neighbors),
        "atomic_numbers": [int(z) for z in mace.atomic_numbers],
        "correlation": [_correlation(p) for p in products],
        "gate": _gate(readout),
        "pair_repulsion": hasattr(mace, "pair_repulsion_fn"),
        "apply_cutoff": bool(getattr(mace, "apply_cutoff", True)),
        "use_reduced_cg": bool(getattr(mace, "use_reduced_cg", False)),
        "use_so3": bool(getattr(mace, "use_so3", False)),
        "use_agnostic_product": bool(getattr(mace, "use_agnostic_product", False)),
        "use_last_readout_only": bool(getattr(mace, "use_last_readout_only", False)),
        "use_embedding_readout": hasattr(mace, "embedding_readout"),
        "distance_transform": _distance_transform(mace),
        "edge_irreps": getattr(mace, "edge_irreps", None),
        "use_edge_irreps_first": bool(getattr(mace, "use_edge_irreps_first", False)),
        "radial_MLP": _radial_mlp(interactions[0]),
        "radial_type": _radial_type(mace),
        "heads": heads,
        "embedding_specs": getattr(mace, "embedding_specs", None),
        "readout_cls": type(readout),
    }
    if hasattr(mace, "scale_shift"):
        args["atomic_inter_scale"] = (
            mace.scale_shift.scale.detach().cpu().numpy().copy()
        )
        args["atomic_inter_shift"] = (
            mace.scale_shift.shift.detach().cpu().numpy().copy()
        )
    return args


def reduced_cg(mace: torch.nn.Module) -> bool:
    """Whether the symmetric contractions use mace-torch's reduced coupling basis.

    mace-torch builds the reduced basis only when cuEquivariance is importable, so
    a file's ``use_reduced_cg`` flag alone does not tell: compare the size of the
    stored basis with the full one."""
    if is_cueq(mace):
        return bool(getattr(mace, "use_reduced_cg", False))
    from mace.tools.cg import U_matrix_real

    block = mace.products[0].symmetric_contractions
    for contraction, (_, irrep) in zip(
        block.contractions, o3.Irreps(str(block.irreps_out)), strict=True
    ):
        correlation = int(contraction.correlation)
        stored = getattr(contraction, f"U_matrix_{correlation}")
        with float64_default():
            full = U_matrix_real(
                irreps_in=contraction.coupling_irreps,
                irreps_out=o3.Irreps(str(irrep)),
                correlation=correlation,
                use_cueq_cg=False,
            )[-1]
        if tuple(full.shape) != tuple(stored.shape):
            return True
    return False


def _projection(contraction: torch.nn.Module, correlation: int) -> torch.Tensor:
    """cuEquivariance's change of basis for the reduced coupling basis."""
    import cuequivariance as cue
    from mace.tools.cg import O3_e3nn
    from mace.tools.cg_cueq_tools import symmetric_contraction_proj

    irreps_in = o3.Irreps([ir for _, ir in o3.Irreps(str(contraction.irreps_in))])
    irreps_out = o3.Irreps([ir for _, ir in o3.Irreps(str(contraction.irreps_out))])
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


__all__ = [
    "INSTALL_HINT",
    "constructor_args",
    "convert",
    "copy_weights",
    "mul_ir_order",
    "cueq_available",
    "is_cueq",
    "require_cueq",
]
