"""RMSE and MAE in the units of the targets, without rescaling every batch twice.

The model trains on scaled targets (metatrain's scaler divides each target by its
scale), while the logged errors are in the units of the targets. The plain way is to
multiply predictions and targets of every batch by the scales again, two passes over
every TensorMap per batch. For a per-structure target the per-target scale is one
number per block that multiplies values and gradients (forces, stress) alike, so the
errors can be accumulated in scaled units and multiplied by the scale once, at the
end; only per-atom targets (per-type scales) are rescaled batch by batch.
"""

from typing import Dict, List, Optional, Tuple, Union

import torch
from metatensor.torch import TensorMap
from metatomic.torch import System
from metatrain.scaler import Scaler
from metatrain.utils.metrics import MAEAccumulator, RMSEAccumulator

from metatrain_mace.train.distributed import sum_over_ranks


Accumulator = Union[RMSEAccumulator, MAEAccumulator]


def uniform_scale(scaler: Scaler, name: str) -> Optional[float]:
    """The per-target scale of ``name`` when it is one number for all its values and
    gradients (a per-structure target whose blocks share one scale), else None."""
    scales = scaler.model
    if scales.sample_kinds.get(name) != "per_structure":
        return None
    if name not in scales.per_target_scales:
        return None
    values = torch.cat([b.values.reshape(-1) for b in scales.per_target_scales[name]])
    if not bool((values == values[0]).all()):
        return None
    return float(values[0])


class TargetUnitMetrics:
    """Accumulates RMSE (and MAE with ``with_mae``) in the units of the targets."""

    def __init__(
        self,
        scaler: Scaler,
        target_names: List[str],
        separate_blocks: bool,
        with_mae: bool,
    ) -> None:
        self.scaler = scaler
        # each accumulator with the power of the scale its sums carry: squared
        # errors (RMSE) scale with scale**2, absolute errors (MAE) with scale
        kinds = [(RMSEAccumulator, 2)] + ([(MAEAccumulator, 1)] if with_mae else [])
        self.accumulators: List[Tuple[Accumulator, int]] = [
            (kind(separate_blocks), power) for kind, power in kinds
        ]
        # targets with one scale: accumulated in scaled units, one set per target
        self.scales: Dict[str, float] = {}
        self.scaled: Dict[str, List[Accumulator]] = {}
        for name in target_names:
            scale = uniform_scale(scaler, name)
            if scale is not None:
                self.scales[name] = scale
                self.scaled[name] = [kind(separate_blocks) for kind, _ in kinds]

    def update(
        self,
        systems: List[System],
        predictions: Dict[str, TensorMap],
        targets: Dict[str, TensorMap],
        extra_data: Dict[str, TensorMap],
    ) -> None:
        """Add one batch; ``predictions`` and ``targets`` are in scaled units."""
        rest = [name for name in targets if name not in self.scales]
        for name in targets:
            for accumulator in self.scaled.get(name, []):
                accumulator.update(
                    {name: predictions[name]}, {name: targets[name]}, extra_data
                )
        if len(rest) == 0:
            return
        in_target_units = [
            self.scaler.apply_scales(
                systems,
                {name: tensors[name] for name in rest},
                remove=False,
                use_per_target_scales=True,
                use_per_property_scales=False,
            )
            for tensors in (predictions, targets)
        ]
        for accumulator, _ in self.accumulators:
            accumulator.update(*in_target_units, extra_data)

    def finalize(
        self,
        not_per_atom: List[str],
        device: torch.device,
        is_distributed: bool = False,
    ) -> Dict[str, float]:
        """The metrics of all batches so far, named as metatrain names them; with
        ``is_distributed``, of the batches of all ranks (the sums are reduced in
        float64, in one call per accumulator)."""
        metrics: Dict[str, float] = {}
        for i, (accumulator, power) in enumerate(self.accumulators):
            for name, scaled in self.scaled.items():
                factor = self.scales[name] ** power
                for key, (total, count) in scaled[i].information.items():
                    accumulator.information[key] = (total * factor, count)
            if is_distributed:
                sum_over_ranks(accumulator.information, device)
            metrics.update(
                accumulator.finalize(not_per_atom=not_per_atom, device=device)
            )
        return metrics
