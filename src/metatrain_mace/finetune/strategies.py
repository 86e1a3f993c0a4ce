"""Fine-tuning strategies: which parameters train when starting from a checkpoint."""

import logging
from typing import Any, Dict, List

import torch

from metatrain_mace.finetune import lora
from metatrain_mace.parameter_names import user_name


#: key of ``finetune_config`` listing the targets whose head is a copy of MACE's
#: readouts, so that loading a checkpoint rebuilds them before its weights
READOUT_HEADS_KEY = "readout_heads"
#: key of ``finetune_config`` listing every head that ``inherit_heads`` filled in
#: this or an earlier fine-tuning: a later round keeps their trained weights
INHERITED_KEY = "inherited_heads"


def apply_finetuning(
    model: torch.nn.Module, strategy: Dict[str, Any]
) -> torch.nn.Module:
    """Set ``requires_grad`` following ``strategy`` and copy inherited heads.

    ``full`` trains every parameter; ``heads`` trains only parameters whose names
    start with one of ``config.head_modules`` or ``config.last_layer_modules``;
    ``lora`` wraps the linear layers matching ``config.target_modules`` in
    equivariant low-rank adapters (:mod:`metatrain_mace.finetune.lora`) and trains only
    those adapters and the modules of ``config.trainable_modules``.
    ``inherit_heads`` maps a new target to an existing one whose head weights
    initialise it; when the existing one is ``mace_head_target``, the new target
    gets a copy of MACE's readouts (:func:`inherit_heads`).
    """
    method = strategy["method"]
    if method not in ("full", "heads", "lora"):
        raise ValueError(
            f"unknown fine-tuning method {method!r} in 'finetune.method'; use "
            "'full', 'heads' or 'lora'"
        )
    # new heads first: the method then decides whether they train
    inherited = inherit_heads(model, strategy.get("inherit_heads") or {})
    # requires_grad_ (not the attribute) so that MACE's EmptyParam stays frozen
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    if method == "heads":
        config = strategy.get("config") or {}
        prefixes = list(config.get("head_modules", ["heads"])) + list(
            config.get("last_layer_modules", ["mace.readouts"])
        )
        matched = False
        for name, parameter in model.named_parameters():
            name = user_name(name)
            parameter.requires_grad_(any(name.startswith(p) for p in prefixes))
            matched = matched or parameter.requires_grad
        if not matched:
            raise ValueError(
                f"no parameter name starts with any of {prefixes}; check "
                "'finetune.config.head_modules' and 'last_layer_modules'"
            )
    elif method == "lora":
        _apply_lora(model, strategy.get("config") or {})

    model.finetune_config = dict(strategy)
    if model.heads.readout_heads:
        model.finetune_config[READOUT_HEADS_KEY] = list(model.heads.readout_heads)
    if inherited:
        model.finetune_config[INHERITED_KEY] = inherited
    # adapters stay part of the model whatever later fine-tuning does: the record
    # lets load_checkpoint insert them again before loading the weights
    record = lora.adapter_record(model)
    if record:
        model.finetune_config[lora.RECORD_KEY] = record
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    logging.info(
        f"Fine-tuning method '{method}': {trainable}/{total} parameters trainable"
    )
    return model


def earlier_copies(finetune_config: Dict[str, Any]) -> List[str]:
    """The heads that an earlier fine-tuning filled in from another target (the
    readout copies and every head of ``inherit_heads``), from the record of the
    checkpoint the model was loaded from."""
    config = finetune_config or {}
    names = list(config.get(READOUT_HEADS_KEY) or [])
    names += list(config.get(INHERITED_KEY) or [])
    names += list((config.get("inherit_heads") or {}).keys())
    return sorted(set(names))


def inherit_heads(model: torch.nn.Module, inherit: Dict[str, str]) -> List[str]:
    """Initialise the heads of new targets from those of existing ones; returns
    every head filled in so far, in this or an earlier fine-tuning.

    A head of another target is copied weight for weight. MACE's own readout
    (``mace_head_target``) is copied as a
    :class:`~metatrain_mace.heads.blocks.ReadoutHead`:
    the new target starts from the predictions of the file's head and, trained on
    its own data while the original target keeps training on replay data, forms
    MACE's multi-head fine-tuning. A head that an earlier fine-tuning filled in
    (a second replay round with the same ``inherit_heads``) keeps its trained
    weights, with a warning.
    """
    earlier = earlier_copies(model.finetune_config)
    for destination, source in inherit.items():
        if destination not in model.heads:
            raise ValueError(
                f"cannot initialise the head of {destination!r} from {source!r}: "
                f"{destination!r} is not a new target of the training set (targets "
                f"with a head: {list(model.heads.keys())})"
            )
        if destination in earlier:
            logging.warning(
                f"'inherit_heads' asks to fill the head of {destination!r} from "
                f"{source!r}, but {destination!r} was filled in and trained by an "
                "earlier fine-tuning of this checkpoint: its trained weights are "
                f"kept. Remove {destination!r} from 'inherit_heads' to silence this, "
                "or name a new target to start another copy."
            )
            continue
        if source == model.mace_head_target:
            model.add_readout_head(destination)
            logging.info(
                f"The head of {destination!r} starts as a copy of MACE's readout of "
                f"{source!r}"
            )
        elif source in model.heads:
            model.heads[destination].load_state_dict(model.heads[source].state_dict())
        else:
            raise ValueError(
                f"cannot initialise the head of {destination!r} from {source!r}: "
                f"{source!r} is neither MACE's readout target "
                f"({model.mace_head_target!r}) nor a target with a head "
                f"({list(model.heads.keys())})"
            )
    return sorted(set(earlier) | set(inherit))


def restore_readout_heads(
    model: torch.nn.Module, finetune_config: Dict[str, Any]
) -> None:
    """Insert the readout heads recorded in a checkpoint's ``finetune_config``
    again; call it before loading the checkpoint's state dict."""
    for name in (finetune_config or {}).get(READOUT_HEADS_KEY) or []:
        model.add_readout_head(name)


def _apply_lora(model: torch.nn.Module, config: Dict[str, Any]) -> None:
    """Insert the adapters and train only them and ``trainable_modules``."""
    if model.trunk.uses_cueq:
        raise ValueError(
            "LoRA fine-tuning runs on e3nn only (its adapters wrap e3nn linears): "
            "set 'enable_cueq: false' in the model hyperparameters"
        )
    known = {"rank", "alpha", "target_modules", "trainable_modules"}
    unknown = sorted(set(config) - known)
    if unknown:
        raise ValueError(
            f"unknown keys {unknown} in 'finetune.config' for method 'lora'; "
            f"the keys are {sorted(known)}"
        )
    for key in ("rank", "alpha"):
        if key not in config:
            raise ValueError(
                f"'finetune.config.{key}' is required for method 'lora' (for example "
                "'config: {rank: 4, alpha: 8.0}')"
            )
    targets = config.get("target_modules")
    if targets is None:
        targets = lora.DEFAULT_TARGET_MODULES
    trainable = config.get("trainable_modules")
    if trainable is None:
        trainable = lora.DEFAULT_TRAINABLE_MODULES
    selected = lora.insert_adapters(model, targets, config["rank"], config["alpha"])
    logging.info(f"LoRA adapters on {len(selected)} layers: {selected}")

    adapted = [name + ".lora_down." for name in selected] + [
        name + ".lora_up." for name in selected
    ]
    prefixes = adapted + [prefix.rstrip(".") + "." for prefix in trainable]
    for name, parameter in model.named_parameters():
        name = user_name(name)
        parameter.requires_grad_(any(name.startswith(p) for p in prefixes))
