"""Training defaults that changed between versions, and what a restart keeps.

A ``--restart`` continues one run: it must not switch that run to defaults that
came after it began (an EMA that appears half-way, for example). Every checkpoint
records the generation of defaults its run began under
(:attr:`~metatrain_mace.train.state.TrainingState.hyper_defaults`); when a run
that began under older defaults is restarted, :func:`restart_hypers` puts back
the values it recorded for the hypers whose default changed since, unless the
options file asks for something other than today's default.
"""

import logging
from typing import Any, Dict, Optional

from metatrain.utils.architectures import get_default_hypers

from metatrain_mace.checkpoints import ARCHITECTURE_NAME


HYPER_DEFAULTS = 5
"""Generation of the training defaults. Runs begun before checkpoints recorded it
count as 3; generation 4 (trainer checkpoint version 4) turned the EMA on,
generation 5 selects the best model by the validation loss."""

DEFAULTS_BEFORE: Dict[int, Dict[str, Any]] = {
    4: {"ema_decay": None},
    5: {"best_model_metric": "mae_prod"},
}
"""For each generation, the defaults it changed, with their earlier values."""


def changed_since(generation: int) -> Dict[str, Any]:
    """The hypers whose default changed after defaults ``generation``, with their
    value under that generation."""
    changed: Dict[str, Any] = {}
    for version in sorted(DEFAULTS_BEFORE, reverse=True):
        if version > generation:
            changed.update(DEFAULTS_BEFORE[version])
    return changed


def restart_hypers(
    hypers: Dict[str, Any],
    recorded: Optional[Dict[str, Any]],
    generation: int,
) -> Dict[str, Any]:
    """The training hypers of a restart of a run begun under defaults
    ``generation`` that recorded the hypers ``recorded``.

    ``hypers`` are the options of the restart, with today's defaults filled in.
    A hyper whose default changed since ``generation`` and that is at today's
    default takes the recorded value (the options file did not ask for a change,
    or asked for today's default, which cannot be told apart); one set to anything
    else keeps it. Each value put back is logged."""
    if recorded is None:
        return hypers
    defaults = get_default_hypers(ARCHITECTURE_NAME)["training"]
    restarted = dict(hypers)
    kept = {}
    for name, earlier in changed_since(generation).items():
        value = recorded.get(name, earlier)
        if hypers.get(name) == defaults[name] and value != defaults[name]:
            restarted[name] = value
            kept[name] = value
    if kept:
        settings = ", ".join(f"{name}: {value}" for name, value in kept.items())
        logging.info(
            "This run began under earlier defaults of metatrain-mace; the restart "
            f"continues it with its recorded {settings} (today's default: "
            + ", ".join(f"{name}: {defaults[name]}" for name in kept)
            + "). To train with today's defaults, fine-tune from the checkpoint "
            "(training.finetune.read_from) instead of restarting."
        )
    return restarted
