"""Build ``mace.modules.MACE`` from the model hyperparameters, with clear errors."""

from typing import Any, Dict, List, Optional

import numpy as np
import torch

from metatrain_mace.mace_import import mace_modules, o3
from metatrain_mace.trunk.backend import cueq_config, float64_default, require_cueq
from metatrain_mace.trunk.conditioning import check_specs
from metatrain_mace.trunk.scripting import quiet_torchscript


def parse_irreps(name: str, value: str) -> o3.Irreps:
    """Parse an irreps string, naming the hyperparameter when it is invalid."""
    try:
        return o3.Irreps(value)
    except (ValueError, AssertionError, TypeError) as err:
        raise ValueError(
            f"invalid irreps for '{name}': {value!r} ({err}). Irreps are written like "
            "'128x0e + 128x1o': a multiplicity, 'x', a degree l and a parity 'e' or "
            "'o', joined by '+'."
        ) from err


def check_model_hypers(hypers: Dict[str, Any]) -> None:
    """Refuse hyperparameters that MACE cannot build, before anything is trained."""
    if hypers["r_max"] <= 0:
        raise ValueError(f"'r_max' must be positive, got {hypers['r_max']}")
    if hypers["correlation"] < 1:
        raise ValueError(
            f"'correlation' must be at least 1, got {hypers['correlation']}"
        )
    if hypers["num_interactions"] < 1:
        raise ValueError(
            f"'num_interactions' must be at least 1, got {hypers['num_interactions']}"
        )
    hidden = parse_irreps("hidden_irreps", hypers["hidden_irreps"])
    multiplicities = sorted({mul for mul, _ in hidden})
    if len(multiplicities) != 1:
        raise ValueError(
            f"'hidden_irreps' = {hypers['hidden_irreps']!r} has unequal "
            f"multiplicities {multiplicities}; MACE needs the same number of "
            f"channels for every irrep, e.g. '{multiplicities[-1]}x0e + "
            f"{multiplicities[-1]}x1o'"
        )
    if hidden.count(o3.Irrep("0e")) == 0:
        raise ValueError(
            f"'hidden_irreps' = {hypers['hidden_irreps']!r} has no scalars (0e); "
            "MACE needs them, e.g. '128x0e + 128x1o'"
        )
    mlp = parse_irreps("MLP_irreps", hypers["MLP_irreps"])
    if any(irrep != o3.Irrep("0e") for _, irrep in mlp):
        raise ValueError(
            f"'MLP_irreps' = {hypers['MLP_irreps']!r} must contain only scalars (0e)"
        )
    if hypers["edge_irreps"] is not None:
        parse_irreps("edge_irreps", hypers["edge_irreps"])
    if hypers["use_embedding_readout"] and not hypers["embedding_specs"]:
        raise ValueError(
            "'use_embedding_readout: true' reads an energy out of the charge/spin "
            "embedding: set 'embedding_specs' too, or set it to false"
        )
    specs = embedding_specs(hypers)
    if specs is not None:
        check_specs(specs, "'embedding_specs'")
        for name, spec in specs.items():
            if spec["type"] == "categorical" and "num_classes" not in spec:
                raise ValueError(
                    f"'embedding_specs' -> {name}: a categorical embedding needs "
                    "'num_classes' (and usually 'offset'), e.g. num_classes: 21, "
                    "offset: 10 for charges from -10 to 10"
                )


def embedding_specs(hypers: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """mace-torch's ``embedding_specs`` from the ``embedding_specs`` hyper (every
    quantity per structure, categorical offsets defaulting to 0)."""
    if not hypers.get("embedding_specs"):
        return None
    specs: Dict[str, Any] = {}
    for name, spec in hypers["embedding_specs"].items():
        spec = {"per": "graph", **dict(spec)}
        if spec["type"] == "categorical":
            spec.setdefault("offset", 0)
        else:
            spec["in_dim"] = 1
        specs[name] = spec
    return specs


@quiet_torchscript()
def build_mace(hypers: Dict[str, Any], atomic_types: List[int]) -> torch.nn.Module:
    """A new ``mace.modules.MACE`` for ``atomic_types``, in float64.

    MACE computes its Clebsch-Gordan and contraction coefficients in the default
    dtype at construction: building in float64 (and casting down later if needed)
    keeps float64 models exactly equivariant.
    """
    check_model_hypers(hypers)
    if hypers.get("enable_cueq"):
        require_cueq()
    edge_irreps = hypers["edge_irreps"]
    avg_num_neighbors = hypers["avg_num_neighbors"]
    with float64_default():
        model = mace_modules.MACE(
            r_max=float(hypers["r_max"]),
            num_bessel=hypers["num_radial_basis"],
            num_polynomial_cutoff=hypers["num_cutoff_basis"],
            max_ell=hypers["max_ell"],
            interaction_cls=mace_modules.interaction_classes[hypers["interaction"]],
            interaction_cls_first=mace_modules.interaction_classes[
                hypers["interaction_first"]
            ],
            num_interactions=hypers["num_interactions"],
            num_elements=len(atomic_types),
            hidden_irreps=o3.Irreps(hypers["hidden_irreps"]),
            MLP_irreps=o3.Irreps(hypers["MLP_irreps"]),
            atomic_energies=np.zeros(len(atomic_types)),
            avg_num_neighbors=1.0 if avg_num_neighbors is None else avg_num_neighbors,
            atomic_numbers=list(atomic_types),
            correlation=hypers["correlation"],
            gate=mace_modules.gate_dict[hypers["gate"]],
            pair_repulsion=hypers["pair_repulsion"],
            apply_cutoff=hypers["apply_cutoff"],
            use_agnostic_product=hypers["use_agnostic_product"],
            use_last_readout_only=hypers["use_last_readout_only"],
            embedding_specs=embedding_specs(hypers),
            use_embedding_readout=hypers["use_embedding_readout"],
            distance_transform=hypers["distance_transform"],
            edge_irreps=None if edge_irreps is None else o3.Irreps(edge_irreps),
            radial_MLP=list(hypers["radial_MLP"]),
            radial_type=hypers["radial_type"],
            # mace-torch switches to a reduced coupling basis (other weight shapes)
            # whenever cuEquivariance is importable: pin the full basis, so that a
            # model has the same weights with or without the cueq extra installed
            use_reduced_cg=False,
            cueq_config=cueq_config() if hypers.get("enable_cueq") else None,
        )
    return model


def node_feature_irreps(mace: torch.nn.Module) -> o3.Irreps:
    """Irreps of the node features of all layers, concatenated in layer order."""
    irreps = o3.Irreps("")
    for product in mace.products:
        irreps = irreps + o3.Irreps(str(product.linear.irreps_out))
    return irreps


def set_avg_num_neighbors(mace: torch.nn.Module, value: float) -> None:
    """Set the neighbour-sum normalisation of every interaction block."""
    for interaction in mace.interactions:
        interaction.avg_num_neighbors = float(value)
