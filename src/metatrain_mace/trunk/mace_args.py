"""The constructor arguments of a MACE module, read back from the module itself.

A MACE model file is a pickle of the module, without the arguments it was built
with. Reading them back lets this package build a twin of the module (in the other
backend, see :mod:`metatrain_mace.trunk.cueq`), name the architecture hypers a file
fixes (:func:`metatrain_mace.trunk.foundation.file_hypers`) and record a trunk in an
exported model as plain JSON (:mod:`metatrain_mace.tools.provenance`), never as a
pickle.
"""

import importlib
import inspect
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from metatrain_mace.mace_import import mace_modules, o3
from metatrain_mace.trunk.backend import float64_default, is_cueq


#: arguments holding irreps, written as their string and read back as o3.Irreps
IRREPS_ARGS = ("hidden_irreps", "MLP_irreps", "edge_irreps")
#: arguments holding classes of mace-torch (the blocks the model is made of)
CLASS_ARGS = ("interaction_cls", "interaction_cls_first", "readout_cls")
#: arguments holding arrays (one value per element and head, or per head)
ARRAY_ARGS = ("atomic_energies", "atomic_inter_scale", "atomic_inter_shift")


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
    # the gated non-linearity of the dipole readouts
    gated = getattr(readout, "equivariant_nonlin", None)
    for name in ("_act_scalar", "_act_gate"):
        if getattr(gated, name, None) is not None:
            return getattr(gated, name)
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
        "atomic_energies": _atomic_energies(mace),
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
    if not isinstance(mace, mace_modules.MACE):
        args = _dipole_class_args(mace, args)
    return args


def _atomic_energies(mace: torch.nn.Module) -> Any:
    """The isolated-atom energies of ``mace`` (``None`` for the dipole classes
    without an energy)."""
    if not hasattr(mace, "atomic_energies_fn"):
        return None
    return mace.atomic_energies_fn.atomic_energies.detach().cpu().numpy()


def _dipole_class_args(mace: torch.nn.Module, args: Dict[str, Any]) -> Dict[str, Any]:
    """The arguments of mace-torch's dipole classes (``AtomicDipolesMACE``,
    ``AtomicDielectricMACE``, ``EnergyDipolesMACE``): only those their constructor
    takes; their non-linear readout keeps ``MLP_irreps`` whole."""
    accepted = inspect.signature(type(mace).__init__).parameters
    kept = {name: value for name, value in args.items() if name in accepted}
    kept["MLP_irreps"] = _irreps(mace.readouts[-1].hidden_irreps)
    # one correlation order for every layer
    kept["correlation"] = int(args["correlation"][0])
    if "use_polarizability" in accepted:
        kept["use_polarizability"] = bool(mace.use_polarizability)
    return kept


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


def _class_name(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def _mace_class(name: str) -> type:
    """A class of mace-torch from its recorded name; nothing else is imported."""
    module, _, qualname = name.partition(":")
    if module != "mace" and not module.startswith("mace."):
        raise ValueError(f"refusing to import {name!r}: not a class of mace-torch")
    found: Any = importlib.import_module(module)
    for part in qualname.split("."):
        found = getattr(found, part)
    if not isinstance(found, type) or not issubclass(found, torch.nn.Module):
        raise ValueError(f"{name!r} is not a torch module class of mace-torch")
    return found


def _gate_name(gate: Any) -> Optional[str]:
    if gate is None:
        return None
    name = gate.__name__
    if _gate_function(name) is not gate:
        raise ValueError(f"cannot record the readout gate {gate!r} by name")
    return name


#: the readout gates a record may name (element-wise activations of torch)
GATES = ("silu", "tanh", "abs", "relu", "gelu", "sigmoid", "softplus", "elu", "mish")


def _gate_function(name: str) -> Any:
    if name not in GATES:
        raise ValueError(f"unknown readout gate {name!r}: expected one of {GATES}")
    found = getattr(torch.nn.functional, name, None)
    return found if found is not None else getattr(torch, name)


def to_json(args: Dict[str, Any]) -> Dict[str, Any]:
    """``constructor_args`` as JSON-compatible values (classes by name, irreps as
    strings, arrays as nested lists)."""
    plain: Dict[str, Any] = {}
    for key, value in args.items():
        if key in CLASS_ARGS:
            value = _class_name(value)
        elif key in IRREPS_ARGS:
            value = None if value is None else str(_irreps(value))
        elif key in ARRAY_ARGS:
            value = None if value is None else np.asarray(value, np.float64).tolist()
        elif key == "gate":
            value = _gate_name(value)
        plain[key] = value
    return plain


def from_json(plain: Dict[str, Any]) -> Dict[str, Any]:
    """The inverse of :func:`to_json` (a ``"class"`` entry is left out)."""
    args: Dict[str, Any] = {}
    for key, value in plain.items():
        if key == "class":
            continue
        if key in CLASS_ARGS:
            value = _mace_class(value)
        elif key in IRREPS_ARGS:
            value = None if value is None else o3.Irreps(value)
        elif key in ARRAY_ARGS:
            value = None if value is None else np.asarray(value, dtype=np.float64)
        elif key == "gate":
            value = None if value is None else _gate_function(value)
        args[key] = value
    return args


def record(mace: torch.nn.Module) -> Dict[str, Any]:
    """The class and constructor arguments of ``mace``, as JSON-compatible values."""
    args = constructor_args(mace)
    args["use_reduced_cg"] = reduced_cg(mace)
    plain = to_json(args)
    plain["class"] = _class_name(type(mace))
    return plain


def rebuild(plain: Dict[str, Any]) -> torch.nn.Module:
    """A new float64 MACE module, with fresh weights, from :func:`record`.

    Built in float64 like every trunk of this package: some modules keep
    constants computed at construction in the default dtype (e3nn's activation
    normalisation), which are not weights."""
    with float64_default():
        return _mace_class(plain["class"])(**from_json(plain))


__all__ = [
    "constructor_args",
    "from_json",
    "rebuild",
    "record",
    "reduced_cg",
    "to_json",
]
