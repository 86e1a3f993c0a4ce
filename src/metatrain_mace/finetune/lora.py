"""Equivariant low-rank adapters (LoRA) for the linear layers of a MACE model.

Most linear layers of MACE are e3nn ``o3.Linear``: one weight matrix per pair of
equal irreps of the input and the output. A low-rank update of the *flattened*
weight would mix the components of different irreps and break equivariance, so the
adapter of an ``o3.Linear`` is itself made of two ``o3.Linear``::

    y = base(x) + (alpha / rank) * up(down(x))

``down`` maps the input irreps to ``rank`` copies of every irrep that the layer
connects (present in both its input and its output), ``up`` maps those back to the
output irreps. Every path of the update is again a map between equal irreps, so the
adapted layer is exactly as equivariant as the original. ``up`` starts at zero: the
adapted model gives exactly the outputs of the original one until it is trained.

``torch.nn.Linear`` layers (the MLP heads) get the usual LoRA,
``base(x) + (alpha / rank) * up(down(x))`` with plain linear maps.

Which modules carry adapters (with their rank and alpha) is recorded in the model's
``finetune_config`` under :data:`RECORD_KEY`, so that :func:`restore_adapters` can
insert them again when a checkpoint is loaded, before its state dict.
"""

import fnmatch
import logging
import math
from typing import Any, Dict, List, Sequence, Union

import torch

from metatrain_mace.mace_import import e3nn_jit, o3
from metatrain_mace.parameter_names import model_name, user_name


#: key of ``finetune_config`` listing the adapted modules
RECORD_KEY = "lora_adapters"

#: modules adapted when ``config.target_modules`` is not given
DEFAULT_TARGET_MODULES = ["mace.interactions.*.linear", "mace.products.*.linear"]

#: modules that train together with the adapters when ``config.trainable_modules``
#: is not given
DEFAULT_TRAINABLE_MODULES = ["heads"]


def _common_irreps(irreps_in: o3.Irreps, irreps_out: o3.Irreps) -> List[o3.Irrep]:
    """Irreps present in both, in the order of first appearance in the output."""
    inputs = {irrep for _, irrep in irreps_in}
    common: List[o3.Irrep] = []
    for _, irrep in irreps_out:
        if irrep in inputs and irrep not in common:
            common.append(irrep)
    return common


@e3nn_jit.compile_mode("script")
class EquivariantLoRA(torch.nn.Module):
    """An e3nn ``o3.Linear`` (frozen by the fine-tuning) plus a low-rank update.

    :param base: the layer to adapt; it must hold its own, shared weights (MACE's
        linear layers do).
    :param rank: number of copies of every irrep in the low-rank bottleneck.
    :param alpha: the update is scaled by ``alpha / rank``.
    """

    def __init__(self, base: torch.nn.Module, rank: int, alpha: float) -> None:
        super().__init__()
        if not (base.internal_weights and base.shared_weights):
            raise ValueError(
                "LoRA adapters need an o3.Linear with internal, shared weights; "
                "remove this layer from 'finetune.config.target_modules'"
            )
        irreps_in = o3.Irreps(base.irreps_in)
        irreps_out = o3.Irreps(base.irreps_out)
        common = _common_irreps(irreps_in, irreps_out)
        if len(common) == 0:
            raise ValueError(
                f"the o3.Linear {irreps_in} -> {irreps_out} connects no irrep; "
                "remove it from 'finetune.config.target_modules'"
            )
        hidden = o3.Irreps([(rank, irrep) for irrep in common])
        parameter = base.weight
        self.base = base
        self.lora_down = o3.Linear(irreps_in, hidden).to(
            dtype=parameter.dtype, device=parameter.device
        )
        self.lora_up = o3.Linear(hidden, irreps_out).to(
            dtype=parameter.dtype, device=parameter.device
        )
        with torch.no_grad():
            self.lora_up.weight.zero_()
        self.irreps_in = irreps_in
        self.irreps_out = irreps_out
        self.rank = rank
        self.alpha = alpha
        self.scaling = float(alpha) / float(rank)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.scaling * self.lora_up(self.lora_down(x))


class LinearLoRA(torch.nn.Module):
    """A ``torch.nn.Linear`` plus the standard low-rank update.

    :param base: the layer to adapt.
    :param rank: inner dimension of the update.
    :param alpha: the update is scaled by ``alpha / rank``.
    """

    def __init__(self, base: torch.nn.Linear, rank: int, alpha: float) -> None:
        super().__init__()
        parameter = base.weight
        self.base = base
        self.lora_down = torch.nn.Linear(
            base.in_features,
            rank,
            bias=False,
            dtype=parameter.dtype,
            device=parameter.device,
        )
        self.lora_up = torch.nn.Linear(
            rank,
            base.out_features,
            bias=False,
            dtype=parameter.dtype,
            device=parameter.device,
        )
        with torch.no_grad():
            torch.nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
            self.lora_up.weight.zero_()
        self.rank = rank
        self.alpha = alpha
        self.scaling = float(alpha) / float(rank)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.scaling * self.lora_up(self.lora_down(x))


Adapter = Union[EquivariantLoRA, LinearLoRA]
ADAPTER_TYPES = (EquivariantLoRA, LinearLoRA)


def _check_rank_alpha(rank: Any, alpha: Any) -> None:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(
            f"invalid LoRA rank {rank!r} in 'finetune.config.rank': it must be an "
            "integer >= 1 (typical values are 4 to 16)"
        )
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise ValueError(
            f"invalid LoRA alpha {alpha!r} in 'finetune.config.alpha': it must be a "
            "number (the update is scaled by alpha / rank)"
        )


def make_adapter(module: torch.nn.Module, rank: int, alpha: float) -> Adapter:
    """The adapter of one linear layer (``o3.Linear`` or ``torch.nn.Linear``)."""
    _check_rank_alpha(rank, alpha)
    if isinstance(module, o3.Linear):
        return EquivariantLoRA(module, rank, alpha)
    if isinstance(module, torch.nn.Linear):
        return LinearLoRA(module, rank, alpha)
    raise TypeError(
        f"cannot add a LoRA adapter to a {type(module).__name__}: only e3nn o3.Linear "
        "and torch.nn.Linear layers are supported"
    )


def adapters(model: torch.nn.Module) -> Dict[str, Adapter]:
    """The adapters of ``model``, by module name (as users write it, see
    :mod:`metatrain_mace.parameter_names`)."""
    return {
        user_name(name): module
        for name, module in model.named_modules()
        if isinstance(module, ADAPTER_TYPES)
    }


def _linear_layers(model: torch.nn.Module) -> Dict[str, torch.nn.Module]:
    """Layers that can carry (or carry) an adapter, not those inside adapters."""
    inside = [name + "." for name in adapters(model)]
    layers: Dict[str, torch.nn.Module] = {}
    for name, module in model.named_modules():
        name = user_name(name)
        if any(name.startswith(prefix) for prefix in inside):
            continue
        if isinstance(module, ADAPTER_TYPES + (o3.Linear, torch.nn.Linear)):
            layers[name] = module
    return layers


def matches(name: str, pattern: str) -> bool:
    """Whether module ``name`` matches a ``target_modules`` pattern.

    A pattern is a glob (``*`` matches any characters, dots included) matched against
    the whole module name, or against its last components: ``linear`` matches
    ``mace.products.0.linear``.
    """
    return fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(
        name, "*." + pattern
    )


def _set_submodule(model: torch.nn.Module, name: str, module: torch.nn.Module) -> None:
    parent_name, _, child = model_name(name).rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def insert_adapters(
    model: torch.nn.Module,
    target_modules: Sequence[str],
    rank: int,
    alpha: float,
) -> List[str]:
    """Wrap every linear layer matching ``target_modules`` in an adapter.

    Layers that already carry an adapter keep it (a second LoRA fine-tuning goes on
    training the same adapters). Every pattern must match at least one linear layer.

    :return: the names of the matched layers (new and existing adapters).
    """
    _check_rank_alpha(rank, alpha)
    if isinstance(target_modules, str) or len(target_modules) == 0:
        raise ValueError(
            f"'finetune.config.target_modules' must be a non-empty list of module "
            f"name patterns, got {target_modules!r}; the default is "
            f"{DEFAULT_TARGET_MODULES}"
        )
    layers = _linear_layers(model)
    selected: List[str] = []
    for pattern in target_modules:
        found = [name for name in layers if matches(name, pattern)]
        if len(found) == 0:
            raise ValueError(
                f"the LoRA target_modules pattern {pattern!r} matches no linear layer "
                "of this model; fix 'finetune.config.target_modules'. Linear layers "
                f"that can be adapted: {sorted(layers)}"
            )
        selected.extend(name for name in found if name not in selected)
    for name in selected:
        layer = layers[name]
        if not isinstance(layer, ADAPTER_TYPES):
            _set_submodule(model, name, make_adapter(layer, rank, alpha))
        elif (layer.rank, float(layer.alpha)) != (rank, float(alpha)):
            logging.warning(
                f"{name} already has a LoRA adapter of rank {layer.rank} and alpha "
                f"{layer.alpha}; it keeps training with these, not rank {rank} and "
                f"alpha {alpha}"
            )
    return selected


def merged_weights(adapter: Adapter) -> Dict[str, torch.Tensor]:
    """The weights of ``adapter``'s base layer with the low-rank update folded in:
    one layer that computes what the adapted layer computes (for files that other
    programs read, see :mod:`metatrain_mace.tools.to_mace`).

    An ``o3.Linear`` computes ``y[v, m] = path_weight * sum_u w[u, v] x[u, m]`` for
    each pair of equal irreps; the merged ``w`` is read from the adapted layer's
    response to unit inputs, and checked to reproduce it."""
    base = adapter.base
    weight = base.weight.detach()
    with torch.no_grad():
        if isinstance(adapter, LinearLoRA):
            update = adapter.lora_up.weight @ adapter.lora_down.weight
            return {**base.state_dict(), "weight": weight + adapter.scaling * update}
        irreps_in = o3.Irreps(base.irreps_in)
        irreps_out = o3.Irreps(base.irreps_out)
        unit = torch.eye(irreps_in.dim, dtype=weight.dtype, device=weight.device)
        response = adapter(unit)
        folded = torch.empty_like(weight)
        offset = 0
        for instruction in base.instructions:
            mul_in, irrep = irreps_in[instruction.i_in]
            mul_out, _ = irreps_out[instruction.i_out]
            start_in = irreps_in[: instruction.i_in].dim
            start_out = irreps_out[: instruction.i_out].dim
            block = response[
                start_in : start_in + mul_in * irrep.dim : irrep.dim,
                start_out : start_out + mul_out * irrep.dim : irrep.dim,
            ]
            size = mul_in * mul_out
            folded[offset : offset + size] = (block / instruction.path_weight).reshape(
                -1
            )
            offset += size
        if offset != weight.numel():
            raise ValueError(
                f"cannot merge the LoRA adapter of an o3.Linear {irreps_in} -> "
                f"{irreps_out}: its weights are not one matrix per pair of irreps"
            )
        original = base.weight.detach().clone()
        base.weight.copy_(folded)
        try:
            reproduced = base(unit)
        finally:
            base.weight.copy_(original)
        error = float((reproduced - response).abs().max())
        size = float(response.abs().max().clamp_min(1e-300))
        if error > 1e-10 * size:
            raise ValueError(
                f"the merged LoRA adapter of an o3.Linear {irreps_in} -> {irreps_out} "
                f"differs from the adapted layer by {error:.1e}; please report this"
            )
        return {**base.state_dict(), "weight": folded}


def merged_state_dict(module: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """``module.state_dict()`` with every adapter inside folded into its base layer
    (names as if the adapters had never been inserted)."""
    state = module.state_dict()
    for name, adapter in module.named_modules():
        if not isinstance(adapter, ADAPTER_TYPES):
            continue
        prefix = name + "." if name else ""
        for key in [key for key in state if key.startswith(prefix)]:
            del state[key]
        for key, value in merged_weights(adapter).items():
            state[prefix + key] = value
    return state


def adapter_record(model: torch.nn.Module) -> Dict[str, Dict[str, Any]]:
    """``{module name: {"rank", "alpha"}}`` of the adapters of ``model``."""
    return {
        name: {"rank": int(adapter.rank), "alpha": float(adapter.alpha)}
        for name, adapter in adapters(model).items()
    }


def restore_adapters(
    model: torch.nn.Module, finetune_config: Dict[str, Any]
) -> torch.nn.Module:
    """Insert the adapters listed in a checkpoint's ``finetune_config`` again.

    Call this after building the model from its hypers and before loading the state
    dict of a checkpoint written after LoRA fine-tuning.
    """
    record = (finetune_config or {}).get(RECORD_KEY) or {}
    for name, settings in record.items():
        module = model.get_submodule(model_name(name))
        if isinstance(module, ADAPTER_TYPES):
            continue
        _set_submodule(
            model, name, make_adapter(module, settings["rank"], settings["alpha"])
        )
    return model
