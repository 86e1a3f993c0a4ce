"""Composition baseline and target scales, fitted from data or taken from a MACE file.

metatrain adds a per-element composition baseline and multiplies by a target scale
outside the network. For a model loaded from a MACE file, the file's isolated-atom
energies plus its shift become the composition weights of ``mace_head_target`` and
its scale becomes that target's scale, so the wrapped model reproduces MACE's energy
exactly. Values the user gives in ``atomic_baseline`` / ``fixed_scaling_weights``
win over the file's.
"""

import copy
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Dict, List, Tuple, Union

import metatensor.torch as mts
import numpy as np
import torch
from metatomic.torch import ModelOutput
from metatrain.composition import train_or_load_composition_model
from metatrain.scaler import train_or_load_scaler
from metatrain.utils.neighbor_lists import get_system_with_neighbor_lists

from metatrain_mace.train import distributed
from metatrain_mace.trunk.foundation import energy_baseline


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
    if not model.from_file:
        return atomic_baseline, scaling_weights
    if not isinstance(scaling_weights, str):
        # the dipoles and polarizabilities of MACE's dipole classes come in the
        # file's units, unscaled
        unscaled = {
            name: 1.0
            for name, output in model.readout_targets.items()
            if output != "energy" and name in model.dataset_info.targets
        }
        scaling_weights = {**unscaled, **scaling_weights}
    target = model.mace_head_target
    if target not in model.dataset_info.targets:
        return atomic_baseline, scaling_weights
    offsets, scale = energy_baseline(model.trunk.mace, model.trunk.head_index)
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


def set_up_baselines(
    model: Any,
    hypers: Dict[str, Any],
    train_datasets: List[Any],
    checkpoint_dir: str,
    context: distributed.Context,
) -> Tuple[Any, Any]:
    """Fit the baselines of ``model`` (see :func:`fit_baselines`) and return CPU
    float64 copies of its composition models and scaler for the collate
    functions.

    Rank 0 fits the baselines (and writes their checkpoints); every rank then
    takes rank 0's weights, baselines and scales."""
    if context.is_main:
        fit_baselines(model, hypers, train_datasets, checkpoint_dir)
    distributed.broadcast_state(model, context)
    return collate_copies(model, context.device)


def collate_copies(model: Any, device: torch.device) -> Tuple[Any, Any]:
    """CPU float64 copies of the composition models and the scaler of ``model``,
    used by the collate functions; the model's own stay on ``device``."""
    model.additive_models[0].weights_to(device="cpu", dtype=torch.float64)
    additive_models = copy.deepcopy(
        model.additive_models.to(dtype=torch.float64, device="cpu")
    )
    model.additive_models.to(device)
    model.additive_models[0].weights_to(device=device, dtype=torch.float64)
    model.scaler.scales_to(device="cpu", dtype=torch.float64)
    scaler = copy.deepcopy(model.scaler.to(dtype=torch.float64, device="cpu"))
    model.scaler.to(device)
    model.scaler.scales_to(device=device, dtype=torch.float64)
    return additive_models, scaler


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
    scaling_weights = inherited_scales(model, scaling_weights)
    atomic_baseline = estimated_baselines(
        model, train_datasets, atomic_baseline, scaling_weights
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


def inherited_scales(model: Any, scaling_weights: FixedWeights) -> FixedWeights:
    """Targets whose head is a copy of MACE's readout keep the scale of
    ``mace_head_target`` (unless ``fixed_scaling_weights`` gives one): the copy
    then starts from the original head's predictions, and the two heads weigh
    alike in the loss. A scale fitted on the energies of the new data alone can be
    far smaller (small energy spread) and would blow up the weight of its forces.
    """
    if isinstance(scaling_weights, str) or not model.heads.readout_heads:
        return scaling_weights
    source = model.mace_head_target
    if model.from_file:
        _, scale = energy_baseline(model.trunk.mace, model.trunk.head_index)
    else:
        scales = model.scaler.model.per_target_scales[source]
        scale = float(scales.block().values.reshape(-1)[0])
    inherited = {
        name: scale for name in model.heads.readout_heads if name not in scaling_weights
    }
    for name in inherited:
        logging.info(
            f"The scale of '{name}' is the one of '{source}' ({scale:.6g}), whose "
            "readout its head copies"
        )
    return {**scaling_weights, **inherited}


def estimated_baselines(
    model: Any,
    train_datasets: List[Any],
    atomic_baseline: FixedWeights,
    scaling_weights: FixedWeights,
) -> FixedWeights:
    """Baselines of the targets whose head is a copy of MACE's readout (unless
    ``atomic_baseline`` gives them): those of ``mace_head_target``, corrected per
    element by the least-squares fit of what the copied head leaves unexplained in
    the new data (mace-torch's ``--E0s estimated``).

    A baseline fitted on the new energies alone would count the readout's
    (cohesive) energy twice, since the copy predicts it already; elements absent
    from the new data keep the original head's value.
    """
    if isinstance(atomic_baseline, str) or isinstance(scaling_weights, str):
        return atomic_baseline
    names = [name for name in model.heads.readout_heads if name not in atomic_baseline]
    if not names:
        return atomic_baseline
    source = model.mace_head_target
    types = list(model.atomic_types)
    weights = model.additive_models[0].model.weights[source].block().values
    offsets = np.array(weights.detach().cpu().reshape(-1).tolist(), dtype=float)
    options = model.requested_neighbor_lists()
    parameter = next(model.parameters())
    counts: Dict[str, List[List[int]]] = {name: [] for name in names}
    residuals: Dict[str, List[float]] = {name: [] for name in names}
    was_training = model.training
    model.train()  # the raw outputs, before any baseline and scale
    with torch.no_grad():
        for dataset in train_datasets:
            for index in range(len(dataset)):
                sample = dataset[index]._asdict()
                present = [name for name in names if name in sample]
                if not present:
                    continue
                system = sample["system"].to(parameter.dtype, parameter.device)
                system = get_system_with_neighbor_lists(system, options)
                outputs = model(
                    [system],
                    {name: ModelOutput(sample_kind="system") for name in present},
                )
                number = [int((system.types == t).sum()) for t in types]
                for name in present:
                    predicted = float(scaling_weights[name]) * float(
                        outputs[name].block().values.sum()
                    )
                    reference = float(sample[name].block().values.sum())
                    counts[name].append(number)
                    residuals[name].append(
                        reference - predicted - float(np.dot(number, offsets))
                    )
    model.train(was_training)
    estimated = {}
    for name in names:
        if not counts[name]:
            continue
        correction = np.linalg.lstsq(
            np.array(counts[name], dtype=float),
            np.array(residuals[name]),
            rcond=None,
        )[0]
        values = {
            t: float(o + c) for t, o, c in zip(types, offsets, correction, strict=True)
        }
        estimated[name] = values
        logging.info(
            f"The composition baseline of '{name}' is the one of '{source}' "
            "corrected by a least-squares fit of what the copied head leaves "
            f"unexplained in its data: {values}"
        )
    return {**atomic_baseline, **estimated}


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
