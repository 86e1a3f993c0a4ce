"""MACE's training recipe: an exponential moving average (EMA) of the weights, and
"stage two" (other loss weights and a low learning rate near the end).

The EMA is :func:`torch.optim.swa_utils.get_ema_multi_avg_fn` applied after every
optimizer step to the list of the model's parameters, kept beside the model rather
than in a :class:`~torch.optim.swa_utils.AveragedModel` (which deep-copies the
model; MACE's modules do not deep-copy). For validation, best-model selection and
checkpoints the averaged weights are swapped into the model and back.

Stage two switches, at a chosen epoch, the loss weights and the learning rate
(through :class:`~torch.optim.swa_utils.SWALR`, as mace-torch's ``--swa`` does).
"""

import contextlib
import copy
import logging
from typing import Any, Dict, Iterator, List, Optional

import torch
from torch.optim.swa_utils import SWALR, get_ema_multi_avg_fn


class WeightAverage:
    """Exponential moving average of the parameters of a model.

    :param model: the model whose parameters are averaged (all of them: frozen
        ones simply keep their value).
    :param decay: weight of the past in every update (mace-torch: 0.99).
    """

    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        self.decay = decay
        self.names: List[str] = [name for name, _ in model.named_parameters()]
        self.average: List[torch.Tensor] = [
            p.detach().clone() for _, p in model.named_parameters()
        ]
        self.updates = 0

    def _parameters(self, model: torch.nn.Module) -> List[torch.Tensor]:
        parameters = dict(model.named_parameters())
        return [parameters[name].detach() for name in self.names]

    def current_decay(self) -> float:
        """Decay of the next update: ``min(decay, (1 + t) / (10 + t))`` after ``t``
        updates, the warm-up of ``torch_ema`` that mace-torch uses. Without it the
        average keeps the random initial weights for hundreds of steps (0.99^200 =
        13% of them after 200 steps) and validation lags training by epochs."""
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    def update(self, model: torch.nn.Module) -> None:
        """One EMA step, after an optimizer step."""
        update = get_ema_multi_avg_fn(self.current_decay())
        update(self.average, self._parameters(model), self.updates)
        self.updates += 1

    @contextlib.contextmanager
    def applied(self, model: torch.nn.Module) -> Iterator[None]:
        """The model holds the averaged weights inside the block, its own after."""
        current = self._parameters(model)
        saved = [p.clone() for p in current]
        with torch.no_grad():
            for parameter, average in zip(current, self.average, strict=True):
                parameter.copy_(average)
        try:
            yield
        finally:
            with torch.no_grad():
                for parameter, value in zip(current, saved, strict=True):
                    parameter.copy_(value)

    def state_dict(self) -> Dict[str, Any]:
        return {
            "decay": self.decay,
            "updates": self.updates,
            "average": dict(zip(self.names, self.average, strict=True)),
        }

    def load_state_dict(self, state: Dict[str, Any]) -> bool:
        """Take a saved average; False (and the average starts afresh from the
        model) when it describes other parameters."""
        average = state.get("average", {})
        if sorted(average) != sorted(self.names) or any(
            average[name].shape != value.shape
            for name, value in zip(self.names, self.average, strict=True)
        ):
            return False
        self.average = [
            average[name].to(device=value.device, dtype=value.dtype).clone()
            for name, value in zip(self.names, self.average, strict=True)
        ]
        self.updates = int(state.get("updates", 0))
        return True


def stage_two_scheduler(
    optimizer: torch.optim.Optimizer, learning_rate: float
) -> SWALR:
    """mace-torch's stage-two learning rate: every parameter group goes to
    ``learning_rate`` times its ``lr_factor`` within one epoch."""
    rates = [
        learning_rate * group.get("lr_factor", 1.0) for group in optimizer.param_groups
    ]
    return SWALR(optimizer, swa_lr=rates, anneal_epochs=1, anneal_strategy="linear")


GRADIENT_SHORTHANDS = {"forces": "positions", "stress": "strain", "virial": "strain"}


def stage_two_loss(loss: Dict[str, Any], changes: Any) -> Dict[str, Any]:
    """The loss of stage two: metatrain's expanded ``loss`` with the entries of
    ``stage_two_loss`` (same format as ``loss``: a loss type for everything, or
    per target ``weight``, ``type``... and ``forces``/``stress``/``virial`` or
    ``gradients`` entries) put over it."""
    result = copy.deepcopy(dict(loss))
    if changes is None:
        return result
    if isinstance(changes, str):
        for spec in result.values():
            spec["type"] = changes
            for gradient in spec.get("gradients", {}).values():
                gradient["type"] = changes
        return result
    for target, spec in changes.items():
        if target not in result:
            raise ValueError(
                f"'stage_two_loss' has an entry for {target!r}, which is not a "
                f"target of this training (the targets are {sorted(result)})"
            )
        spec = {"type": spec} if isinstance(spec, str) else dict(spec)
        gradients = dict(spec.pop("gradients", None) or {})
        for short, name in GRADIENT_SHORTHANDS.items():
            if short in spec:
                gradients[name] = spec.pop(short)
        result[target].update(spec)
        for name, gradient in gradients.items():
            gradient = {"type": gradient} if isinstance(gradient, str) else gradient
            if name not in result[target].get("gradients", {}):
                raise ValueError(
                    f"'stage_two_loss' sets the {name} gradient of {target!r}, "
                    "which this training does not use"
                )
            result[target]["gradients"][name].update(gradient)
    return result


def check_stage_two(hypers: Dict[str, Any]) -> None:
    """Warn at start-up when stage two is asked for but never starts."""
    start: Optional[int] = hypers.get("stage_two_epoch")
    if start is not None and start >= hypers["num_epochs"]:
        logging.warning(
            f"'stage_two_epoch' is {start}, but the run has 'num_epochs' "
            f"{hypers['num_epochs']} (epochs 0 to {hypers['num_epochs'] - 1}): stage "
            "two never starts, and 'stage_two_loss' and 'stage_two_learning_rate' "
            f"are not used. Set 'stage_two_epoch' below {hypers['num_epochs']} (MACE "
            "starts it at about 80% of the epochs) or remove it."
        )


def in_stage_two(hypers: Dict[str, Any], epoch: int) -> bool:
    start: Optional[int] = hypers.get("stage_two_epoch")
    return start is not None and epoch >= start


def log_stage_two(hypers: Dict[str, Any], epoch: int) -> None:
    logging.info(
        f"Stage two from epoch {epoch}: loss "
        f"{hypers['stage_two_loss'] or 'unchanged'}, learning rate "
        f"{hypers['stage_two_learning_rate']}; the best model is tracked afresh"
    )
