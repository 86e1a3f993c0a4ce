"""Which targets the heads can produce (decided before anything is trained), and
the checks of the energy target the exported model runs, and the names of the
auxiliary outputs the heads add."""

import torch
from metatensor.torch import TensorMap
from metatrain.utils.data import DatasetInfo, TargetInfo

from metatrain_mace.heads.blocks import irrep_of_block
from metatrain_mace.heads.coupling import coupled_parts
from metatrain_mace.heads.products import product_order
from metatrain_mace.mace_import import o3
from metatrain_mace.trunk.response import READOUT_HYPERS


MACE_FEATURES = "mtt::aux::mace_features"
"""Output name of the equivariant MACE node features (see
:mod:`metatrain_mace.heads.features`)."""


def last_layer_features_name(target_name: str) -> str:
    """Name of the auxiliary output holding the last-layer features of a target."""
    return "mtt::aux::" + target_name.replace("mtt::", "") + "_last_layer_features"


def _missing_irrep_message(
    name: str,
    what: str,
    irrep: o3.Irrep,
    declared: o3.Irreps,
    produced: o3.Irreps,
    num_interactions: int,
) -> str:
    """Why ``irrep`` is missing from the node features, and what to change."""
    text = (
        f"target '{name}' {what} needs the irrep {irrep}, which neither the MACE "
        f"node features (they hold {produced.simplify() or 'no irreps'}) nor "
        "products of up to three of them with l <= 2 * max(l of the features) "
        "reach"
    )
    if num_interactions == 1:
        return (
            text + ". With 'num_interactions: 1', MACE keeps only the scalars (0e) "
            "of its single layer: set 'num_interactions' to 2 or more, with "
            f"'{irrep}' in 'hidden_irreps'."
        )
    if irrep not in {ir for _, ir in declared}:
        return (
            text + f". Add '{irrep}' to 'hidden_irreps' (every irrep needs the same "
            f"multiplicity, e.g. '16x0e + 16x{irrep}'), and make sure 'max_ell' "
            f"(at least {irrep.l} is safest) and 'correlation' can reach it."
        )
    return (
        text + f": 'hidden_irreps' declares '{irrep}', but no path of the model "
        "reaches it, so it would always be zero. The spherical harmonics stop at "
        "'max_ell', the symmetric products at 'correlation', and the last of the "
        "'num_interactions' layers keeps only scalars: raise 'max_ell' (to at least "
        f"{irrep.l}), 'correlation' or 'num_interactions' (irreps of unusual parity "
        "such as 1e or 0o need either products of order >= 3 or a second "
        "equivariant layer)."
    )


def check_target(
    name: str,
    info: TargetInfo,
    produced: o3.Irreps,
    declared: o3.Irreps,
    num_interactions: int,
) -> None:
    """Refuse targets whose heads could not produce them (or only zeros).

    :param name: target name, used in the error messages.
    :param info: the target's metatrain description.
    :param produced: irreps that the MACE node features of all layers actually carry
        (see :mod:`metatrain_mace.trunk.irreps`).
    :param declared: irreps the node features of all layers are declared with.
    :param num_interactions: number of MACE layers (the last keeps only scalars).
    """
    if info.sample_kind not in ("system", "atom"):
        raise ValueError(
            f"target '{name}' has samples per {info.sample_kind!r}; metatrain-mace "
            "predicts per-atom and per-structure targets only"
        )
    for key, block in info.layout.items():
        rank = len(block.components)
        if rank > 2:
            raise ValueError(
                f"target '{name}' is a tensor of rank {rank}; metatrain-mace "
                "supports scalars, rank-1 and rank-2 tensors (Cartesian, or spherical "
                "with 'product: cartesian'). Split it into blocks of rank <= 2."
            )
        if info.is_cartesian:
            needed = [o3.Irrep("1o")]
            if rank == 2:
                needed = coupled_parts(o3.Irrep("1o"), o3.Irrep("1o"))
            what = (
                "(a Cartesian vector)" if rank == 1 else "(a Cartesian rank-2 tensor)"
            )
        elif info.is_spherical and rank == 1:
            o3_lambda = int(key["o3_lambda"])
            o3_sigma = int(key["o3_sigma"])
            needed = [irrep_of_block(o3_lambda, o3_sigma)]
            what = f"(block o3_lambda={o3_lambda}, o3_sigma={o3_sigma})"
        elif info.is_spherical:
            first = irrep_of_block(int(key["o3_lambda_1"]), int(key["o3_sigma_1"]))
            second = irrep_of_block(int(key["o3_lambda_2"]), int(key["o3_sigma_2"]))
            needed = coupled_parts(first, second)
            what = f"(block {first} x {second})"
        else:
            continue
        for irrep in needed:
            if product_order(produced, irrep) is None:
                raise ValueError(
                    _missing_irrep_message(
                        name, what, irrep, declared, produced, num_interactions
                    )
                )


def check_readout_target(name: str, info: TargetInfo, output: str) -> None:
    """Refuse a target that MACE's readout ``output`` (``energy``, ``dipole``,
    ``polarizability``) cannot predict as it is."""
    hyper = READOUT_HYPERS[output]
    block = info.layout.block(0)
    n_blocks = len(info.layout)
    one_property = n_blocks == 1 and len(block.properties) == 1
    if output == "energy":
        if info.is_scalar and one_property:
            return
        wanted = "one scalar per atom (an energy)"
    elif output == "dipole":
        spherical_vector = (
            info.is_spherical
            and len(block.components) == 1
            and int(info.layout.keys[0]["o3_lambda"]) == 1
            and int(info.layout.keys[0]["o3_sigma"]) == 1
        )
        cartesian_vector = info.is_cartesian and len(block.components) == 1
        if (
            (spherical_vector or cartesian_vector)
            and one_property
            and info.sample_kind == "system"
        ):
            return
        wanted = (
            "one vector per structure: a per-structure target of type "
            "'cartesian: {rank: 1}' (or spherical, o3_lambda 1, o3_sigma 1) with one "
            "property"
        )
    else:
        if (
            info.is_cartesian
            and len(block.components) == 2
            and one_property
            and info.sample_kind == "system"
        ):
            return
        wanted = (
            "one symmetric 3x3 tensor per structure: a per-structure target of "
            "type 'cartesian: {rank: 2}' with one property"
        )
    raise ValueError(
        f"'{hyper}' is {name!r}, but MACE's {output} readout predicts {wanted}, "
        f"and this target has {n_blocks} block(s), {len(block.properties)} "
        f"properties and samples per {info.sample_kind!r}. Fix the target, or set "
        f"'{hyper}' to another name to give this target a head of its own"
    )


def check_head_target(head_target: str, dataset_info: DatasetInfo) -> None:
    """Refuse a ``mace_head_target`` set to a name that is not a target: a typo
    would silently give the energy an MLP head instead of MACE's readout. The
    default, ``energy``, may name no target (models without an energy)."""
    if head_target in dataset_info.targets or head_target == "energy":
        return
    raise ValueError(
        f"'mace_head_target' is {head_target!r}, which is not one of the targets "
        f"({sorted(dataset_info.targets)}). Set it to the name of the energy target "
        "that MACE's readout should predict, as written in the 'targets' section"
    )


def check_finite(name: str, tensor: TensorMap) -> None:
    """Raise, naming the system, when a prediction of ``name`` is NaN or infinite
    (TorchScript: the exported model runs it on every energy it returns)."""
    block = tensor.block()
    values = block.values.reshape(block.values.shape[0], -1)
    finite = torch.isfinite(values).all(dim=1)
    if not bool(finite.all()):
        row = int(torch.nonzero(torch.logical_not(finite))[0, 0])
        system = int(block.samples.values[row, 0])
        raise ValueError(
            "the predicted '"
            + name
            + "' of system "
            + str(system)
            + " is not finite (NaN or infinite): two of its atoms probably sit at "
            + "the same position, or the structure is far from anything the model "
            + "was trained on"
        )
