"""Optimizer and learning-rate scheduler, built from torch directly.

The parameter groups follow MACE's training recipe: weight decay on the weights of
the interaction linears, the symmetric products and the heads; none on embeddings,
radial MLPs, readouts and biases.
"""

from typing import Any, Dict, List, Union

import torch

from metatrain_mace.documentation import TrainerHypers


Scheduler = Union[
    torch.optim.lr_scheduler.ReduceLROnPlateau, torch.optim.lr_scheduler.ExponentialLR
]


def _decays(name: str) -> bool:
    if name.endswith("bias"):
        return False
    if name.startswith("mace.interactions."):
        return "linear.weight" in name or "skip_tp_full.weight" in name
    if name.startswith("mace.products."):
        return True
    return name.startswith("heads.")


def parameter_groups(
    model: torch.nn.Module, weight_decay: float
) -> List[Dict[str, Any]]:
    """Trainable parameters split into a decayed and a non-decayed group."""
    decay: List[torch.nn.Parameter] = []
    no_decay: List[torch.nn.Parameter] = []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        (decay if _decays(name) else no_decay).append(parameter)
    return [
        {"name": "decay", "params": decay, "weight_decay": weight_decay},
        {"name": "no_decay", "params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(
    model: torch.nn.Module, hypers: TrainerHypers
) -> torch.optim.Optimizer:
    """Adam or AdamW (with amsgrad) over :func:`parameter_groups`.

    torch's fused implementation updates all parameters in one kernel (on CPU and
    CUDA); it computes the same update as the per-parameter loop, several times
    faster for MACE's many small parameter tensors.
    """
    groups = parameter_groups(model, hypers["weight_decay"])
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
