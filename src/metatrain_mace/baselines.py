"""Composition baseline and target scales, fitted from data or taken from a MACE file.

metatrain adds a per-element composition baseline and multiplies by a target scale
outside the network. For a model loaded from a MACE file, the file's isolated-atom
energies plus its shift become the composition weights of ``mace_head_target`` and
its scale becomes that target's scale, so the wrapped model reproduces MACE's energy
exactly. Values the user gives in ``atomic_baseline`` / ``fixed_scaling_weights``
win over the file's.
"""

import logging
import os
import shutil
from pathlib import Path
from typing import Any, Dict, List, Union

import metatensor.torch as mts
import torch
from metatrain.composition import train_or_load_composition_model
from metatrain.scaler import train_or_load_scaler

from metatrain_mace.foundation import energy_baseline


FixedWeights = Union[str, Dict[str, Any]]
MIN_SCALE = 1e-10
"""Smallest fitted target scale taken as real, in the target's unit; a smaller one
means the composition baseline fits the training values to rounding precision."""


def fixed_weights_from_file(
    model: Any, atomic_baseline: FixedWeights, scaling_weights: FixedWeights
) -> "tuple[FixedWeights, FixedWeights]":
    """Merge the MACE file's E0s, shift and scale into the user's fixed weights.

    A user-given float for the head target replaces the file's E0s; a user-given
    dict of per-type values replaces them type by type. A path to a metatrain
    checkpoint (a string) is left untouched.
    """
    target = model.mace_head_target
    if not model.from_file or target not in model.dataset_info.targets:
        return atomic_baseline, scaling_weights
    offsets, scale = energy_baseline(model.mace, model.head_index)
    if not isinstance(atomic_baseline, str):
        user = atomic_baseline.get(target)
        if isinstance(user, dict):
            merged: Any = {**offsets, **{int(k): float(v) for k, v in user.items()}}
        elif user is not None:
            merged = float(user)
        else:
            merged = offsets
        atomic_baseline = {**atomic_baseline, target: merged}
    if not isinstance(scaling_weights, str):
        scaling_weights = {target: scale, **scaling_weights}
    return atomic_baseline, scaling_weights


def fit_baselines(
    model: Any,
    hypers: Dict[str, Any],
    train_datasets: List[Any],
    checkpoint_dir: str,
) -> None:
    """Fit (or fix) the composition baseline and the scaler of ``model``.

    :param model: a :class:`metatrain_mace.model.MetaMACE`.
    :param hypers: trainer hyperparameters (``atomic_baseline``,
        ``fixed_scaling_weights``, ``scale_targets``, ``batch_size``,
        ``per_structure_targets``).
    :param train_datasets: the training sets; may be empty when every weight is
        fixed (direct export of a MACE file).
    :param checkpoint_dir: where metatrain may write the baselines' checkpoints.
    """
    atomic_baseline, scaling_weights = fixed_weights_from_file(
        model, hypers["atomic_baseline"], hypers["fixed_scaling_weights"]
    )
    # metatrain writes the baselines' checkpoints straight onto their final
    # names: write them into a hidden folder and move them once complete
    staging = Path(checkpoint_dir) / ".baselines.tmp"
    staging.mkdir(parents=True, exist_ok=True)
    try:
        _fit(
            model,
            hypers,
            train_datasets,
            str(staging),
            atomic_baseline,
            scaling_weights,
        )
        for written in staging.iterdir():
            os.replace(written, Path(checkpoint_dir) / written.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _fit(
    model: Any,
    hypers: Dict[str, Any],
    train_datasets: List[Any],
    checkpoint_dir: str,
    atomic_baseline: FixedWeights,
    scaling_weights: FixedWeights,
) -> None:
    logging.info("Fitting the composition baseline")
    train_or_load_composition_model(
        composition_model=model.additive_models[0],
        atomic_baseline=atomic_baseline,
        train_datasets=train_datasets,
        other_additive_models=list(model.additive_models[1:]),
        batch_size=hypers["batch_size"],
        is_distributed=False,
        checkpoint_dir=checkpoint_dir,
    )
    if not hypers["scale_targets"]:
        if not model.from_file:
            return
        # the file's scale is part of the model, not a fit to the data
        scaling_weights = {
            name: scaling_weights.get(name, 1.0)
            for name in model.scaler.model.target_names
        }
    if isinstance(scaling_weights, str) and not isinstance(atomic_baseline, str):
        raise ValueError(
            "a scaler checkpoint in 'fixed_scaling_weights' needs a composition "
            "checkpoint in 'atomic_baseline' too"
        )
    logging.info("Fitting the target scales")
    # after a restart with new targets, metatrain's scaler only describes the new
    # ones, but its trainer looks up every target of the batches: describe all
    scaler = model.scaler
    scaler.target_infos = {**scaler.dataset_info.targets, **scaler.target_infos}
    train_or_load_scaler(
        scaler=model.scaler,
        fixed_weights=scaling_weights,
        train_datasets=train_datasets,
        additive_models=model.additive_models,
        batch_size=hypers["batch_size"],
        is_distributed=False,
        checkpoint_dir=checkpoint_dir,
        per_structure_targets=hypers["per_structure_targets"],
    )
    if isinstance(scaling_weights, str):
        return
    for name, value in degenerate_scales(model.scaler, scaling_weights).items():
        logging.warning(
            f"The fitted scale of target '{name}' is {value:.3g}: the composition "
            "baseline already reproduces every training value (too few structures "
            "for the number of elements?), and dividing by this scale would blow "
            "the loss up. The scale is set to 1 instead (every scale of this target, "
            "for targets with several properties); give "
            f"'fixed_scaling_weights: {{{name}: ...}}' to choose it yourself"
        )
        reset_scales(model.scaler, name)


def reset_scales(scaler: Any, name: str) -> None:
    """Set every scale of target ``name`` to 1, in the scaler's TensorMaps and in
    the buffers that checkpoints and the exported model read."""
    maps = {
        "_scaler_buffer": scaler.model.scales,
        "_per_target_scaler_buffer": scaler.model.per_target_scales,
        "_per_property_scaler_buffer": scaler.model.per_property_scales,
    }
    for suffix, scales in maps.items():
        if name not in scales:
            continue
        for block in scales[name].blocks():
            block.values[:] = 1.0
        device = getattr(scaler, name + suffix).device
        buffer = mts.save_buffer(
            mts.make_contiguous(scales[name].to("cpu", torch.float64))
        )
        scaler.register_buffer(name + suffix, buffer.to(device))


def degenerate_scales(scaler: Any, fixed: Dict[str, Any]) -> Dict[str, float]:
    """Fitted (not fixed) target scales that are not finite or below
    :data:`MIN_SCALE`, with their smallest value."""
    degenerate: Dict[str, float] = {}
    for name, scales in scaler.model.scales.items():
        if name in fixed:
            continue
        values = torch.cat([block.values.reshape(-1) for block in scales])
        if values.numel() and not bool(
            (torch.isfinite(values) & (values.abs() > MIN_SCALE)).all()
        ):
            degenerate[name] = float(values.abs().min())
    return degenerate
