"""Fine-tuning strategies: which parameters train when starting from a checkpoint."""

import logging
from typing import Any, Dict

import torch


def apply_finetuning(
    model: torch.nn.Module, strategy: Dict[str, Any]
) -> torch.nn.Module:
    """Set ``requires_grad`` following ``strategy`` and copy inherited heads.

    ``full`` trains every parameter; ``heads`` trains only parameters whose names
    start with one of ``config.head_modules`` or ``config.last_layer_modules``.
    ``inherit_heads`` maps a new target to an existing one whose head weights
    initialise it.
    """
    method = strategy["method"]
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
            parameter.requires_grad_(any(name.startswith(p) for p in prefixes))
            matched = matched or parameter.requires_grad
        if not matched:
            raise ValueError(
                f"no parameter name starts with any of {prefixes}; check "
                "'finetune.config.head_modules' and 'last_layer_modules'"
            )
    elif method != "full":
        raise ValueError(
            f"unknown fine-tuning method {method!r}; use 'full' or 'heads'"
        )

    for destination, source in (strategy.get("inherit_heads") or {}).items():
        if source not in model.heads or destination not in model.heads:
            raise ValueError(
                f"cannot inherit the head of {source!r} into {destination!r}: "
                f"heads exist for {list(model.heads.keys())}"
            )
        model.heads[destination].load_state_dict(model.heads[source].state_dict())

    model.finetune_config = dict(strategy)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    logging.info(
        f"Fine-tuning method '{method}': {trainable}/{total} parameters trainable"
    )
    return model
