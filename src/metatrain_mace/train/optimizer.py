"""Optimizer and learning-rate scheduler, built from torch directly.

The parameter groups follow MACE's training recipe: weight decay on the weights of
the interaction linears, the symmetric products and the heads; none on embeddings,
radial MLPs, readouts and biases. Each block of the model (embedding, interactions,
products, readouts, heads) has its own groups, so that its learning rate can be
scaled (``lr_factors``); leading layers can be frozen (``frozen_layers``).
"""

import logging
from typing import Any, Dict, List, Tuple, Union

import torch

from metatrain_mace.documentation import TrainerHypers
from metatrain_mace.parameter_names import user_name


Scheduler = Union[
    torch.optim.lr_scheduler.ReduceLROnPlateau, torch.optim.lr_scheduler.ExponentialLR
]


def _decays(name: str) -> bool:
    name = user_name(name)
    if name.endswith("bias"):
        return False
    if name.startswith("mace.interactions."):
        return "linear.weight" in name or "skip_tp_full.weight" in name
    if name.startswith("mace.products."):
        return True
    return name.startswith("heads.")


BLOCKS = ("embedding", "interactions", "products", "readouts", "heads")


def block_of(name: str) -> str:
    """The block (one of :data:`BLOCKS`, or ``other``) a parameter belongs to."""
    name = user_name(name)
    if name.startswith(
        ("mace.node_embedding.", "mace.joint_embedding.", "conditioning.")
    ):
        return "embedding"
    if name.startswith("mace.interactions."):
        return "interactions"
    if name.startswith("mace.products."):
        return "products"
    if name.startswith(("mace.readouts.", "mace.embedding_readout.")):
        return "readouts"
    if name.startswith("heads."):
        return "heads"
    return "other"


def freeze_layers(model: torch.nn.Module, n_layers: int) -> List[str]:
    """Freeze the embeddings and the interaction and product blocks of the first
    ``n_layers`` MACE layers (``requires_grad = False``).

    :return: the names of the parameters frozen here.
    """
    if n_layers == 0:
        return []
    available = len(model.trunk.mace.interactions)
    if n_layers > available:
        raise ValueError(
            f"'frozen_layers' is {n_layers}, but the MACE model has {available} "
            f"layers: use at most {available}"
        )
    prefixes: Tuple[str, ...] = ("mace.node_embedding.", "mace.joint_embedding.")
    for i in range(n_layers):
        prefixes += (f"mace.interactions.{i}.", f"mace.products.{i}.")
    frozen: List[str] = []
    for name, parameter in model.named_parameters():
        if user_name(name).startswith(prefixes) and parameter.requires_grad:
            parameter.requires_grad_(False)
            frozen.append(name)
    logging.info(
        f"Frozen: the embeddings and the first {n_layers} of {available} MACE "
        f"layers ({len(frozen)} parameter tensors)"
    )
    return frozen


def parameter_groups(
    model: torch.nn.Module,
    weight_decay: float,
    learning_rate: float,
    lr_factors: Dict[str, float],
) -> List[Dict[str, Any]]:
    """Trainable parameters in groups per block and per weight decay, with the
    block's learning rate (``learning_rate * lr_factors[block]``; factor 1 when
    not given). The factor is kept in each group as ``lr_factor``."""
    groups: Dict[Tuple[str, bool], List[torch.nn.Parameter]] = {}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        groups.setdefault((block_of(name), _decays(name)), []).append(parameter)
    result = []
    for (block, decays), parameters in groups.items():
        factor = float(lr_factors.get(block, 1.0))
        result.append(
            {
                "name": f"{block}/{'decay' if decays else 'no_decay'}",
                "params": parameters,
                "weight_decay": weight_decay if decays else 0.0,
                "lr": learning_rate * factor,
                "lr_factor": factor,
            }
        )
    return result


def base_learning_rate(optimizer: torch.optim.Optimizer) -> float:
    """The learning rate before the per-block factors (what the schedule sets)."""
    for group in optimizer.param_groups:
        if group.get("lr_factor", 1.0) > 0:
            return group["lr"] / group.get("lr_factor", 1.0)
    return 0.0


def same_layout(optimizer: torch.optim.Optimizer, state: Dict[str, Any]) -> bool:
    """Whether a saved optimizer state has the groups of ``optimizer``."""
    saved = state.get("param_groups", [])
    return [g.get("name") for g in saved] == [
        g.get("name") for g in optimizer.param_groups
    ] and [len(g["params"]) for g in saved] == [
        len(g["params"]) for g in optimizer.param_groups
    ]


def build_optimizer(
    model: torch.nn.Module, hypers: TrainerHypers
) -> torch.optim.Optimizer:
    """Adam or AdamW (with amsgrad) over :func:`parameter_groups`.

    torch's fused implementation updates all parameters in one kernel (on CPU and
    CUDA); it computes the same update as the per-parameter loop, several times
    faster for MACE's many small parameter tensors.
    """
    groups = parameter_groups(
        model, hypers["weight_decay"], hypers["learning_rate"], hypers["lr_factors"]
    )
    if not any(group["params"] for group in groups):
        raise ValueError(
            "No parameter of the model trains: 'frozen_layers' "
            f"({hypers['frozen_layers']}), 'lr_factors' ({hypers['lr_factors']}) "
            "or the 'finetune' settings freeze all of them. Train at least the "
            "readouts or heads (for example finetune: {method: heads, config: "
            "{head_modules: [heads], last_layer_modules: [mace.readouts]}})."
        )
    kwargs = {
        "lr": hypers["learning_rate"],
        "amsgrad": hypers["amsgrad"],
        "betas": (hypers["beta"], 0.999),
        "fused": True,
    }
    if hypers["optimizer"] == "adamw":
        return torch.optim.AdamW(groups, **kwargs)
    return torch.optim.Adam(groups, **kwargs)


def build_scheduler(
    optimizer: torch.optim.Optimizer, hypers: TrainerHypers
) -> Scheduler:
    """The learning-rate schedule, stepped once per epoch."""
    if hypers["lr_scheduler"] == "ExponentialLR":
        return torch.optim.lr_scheduler.ExponentialLR(
            optimizer, gamma=hypers["lr_scheduler_gamma"]
        )
    return torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer,
        mode="min",
        factor=hypers["lr_factor"],
        patience=hypers["lr_scheduler_patience"],
    )


def step_scheduler(scheduler: Scheduler, validation_loss: float) -> None:
    """Advance the schedule by one epoch."""
    if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        scheduler.step(validation_loss)
    else:
        scheduler.step()
