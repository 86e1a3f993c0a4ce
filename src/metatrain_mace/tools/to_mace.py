"""Models of this package written back as mace-torch model files.

Every fast or special MACE engine (MACECalculator, mace-torch's LAMMPS exports,
symmetrix, TorchSim's MACE model) reads mace-torch's ``.model`` files: whole pickled
``ScaleShiftMACE`` modules. :func:`to_mace_module` builds one from the energy part
of a :class:`~metatrain_mace.model.MetaMACE`:

- the trunk (MACE's interactions and products) with MACE's readouts of the chosen
  energy target (``mace_head_target``, or a target whose head is a copy of MACE's
  readouts), LoRA adapters folded into the weights, always e3nn;
- metatrain's composition baseline of that target as MACE's ``atomic_energies``,
  and its scale as the scale of ``ScaleShiftMACE`` (shift 0);
- the charge/spin embedding (its readout rescaled: MACE adds it unscaled) and ZBL.

Other targets (dipoles, heads that are not MACE readouts) have no place in a MACE
file and are left out. A multi-head file keeps its heads; the chosen one holds the
baseline and scale of the target. The file records which versions wrote it.
"""

import logging
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from metatrain_mace._version import __version__
from metatrain_mace.checkpoints import atomic_save
from metatrain_mace.finetune.lora import merged_state_dict
from metatrain_mace.mace_import import mace_modules
from metatrain_mace.model import MetaMACE
from metatrain_mace.trunk import foundation, mace_args
from metatrain_mace.trunk.backend import float64_default


#: what MACE's own buffers hold; written from the target's baseline and scale
BASELINE_KEYS = (
    "atomic_energies_fn.atomic_energies",
    "scale_shift.scale",
    "scale_shift.shift",
)


def mace_version() -> str:
    """The version of the installed mace-torch."""
    import mace

    return str(getattr(mace, "__version__", "unknown"))


def readout_targets(model: MetaMACE) -> List[str]:
    """The targets of ``model`` predicted by MACE's readouts (its energies)."""
    found = []
    if model.mace_head_target in model.target_names:
        found.append(model.mace_head_target)
    return found + [n for n in model.heads.readout_heads if n not in found]


def _composition(model: MetaMACE, target: str) -> Dict[int, float]:
    """The composition baseline of ``target``, per atomic number."""
    block = model.additive_models[0].model.weights[target].block()
    values = block.values.detach().to(torch.float64).reshape(-1).tolist()
    types = block.samples.values[:, 0].tolist()
    return {int(t): float(v) for t, v in zip(types, values, strict=True)}


def _scale(model: MetaMACE, target: str) -> float:
    """The scale metatrain's scaler multiplies ``target`` by."""
    values = model.scaler.model.scales[target].block().values
    return float(values.reshape(-1)[0])


def to_mace_module(
    model: MetaMACE, target: Optional[str] = None, dtype: str = "float64"
) -> torch.nn.Module:
    """The energy part of ``model`` as a mace-torch ``ScaleShiftMACE``.

    :param model: a model of this package (any backend, LoRA adapters or not).
    :param target: the energy target to write (``mace_head_target`` by default);
        a target whose head is a copy of MACE's readouts works too.
    :param dtype: ``"float64"`` or ``"float32"``.
    """
    if dtype not in ("float64", "float32"):
        raise ValueError(f"dtype must be 'float64' or 'float32', not {dtype!r}")
    model = model.e3nn_copy()
    if hasattr(model, "long_range"):
        raise ValueError(
            "this model has a long-range energy ('long_range: {enable: true}'), "
            "which a MACE model file cannot hold: the file would give other "
            "energies. Use the exported metatomic model (model.pt)"
        )
    if model.trunk.readout_kind != "energy":
        raise ValueError(
            f"this model was built from a {type(model.trunk.mace).__name__} file, "
            "whose readouts predict dipoles (and polarizabilities or energies) "
            "together; to-mace writes energy models (MACE, ScaleShiftMACE). Use the "
            "exported metatomic model (model.pt)"
        )
    candidates = readout_targets(model)
    if not candidates:
        raise ValueError(
            "this model has no energy predicted by MACE's readouts (its targets: "
            f"{model.target_names}, 'mace_head_target': {model.mace_head_target!r}): "
            "a MACE model file holds an energy model, there is nothing to write"
        )
    if target is None:
        target = candidates[0]
    if target not in candidates:
        raise ValueError(
            f"--head {target!r} is not an energy predicted by MACE's readouts; "
            f"choose one of {candidates}"
        )
    left_out = [name for name in model.target_names if name != target]
    if left_out:
        logging.info(
            f"Left out of the MACE file (a MACE file holds one energy model, "
            f"'{target}'): {left_out}"
        )

    trunk = model.trunk
    state = merged_state_dict(trunk.mace)
    if target != model.mace_head_target:
        readouts = merged_state_dict(model.heads[target].readouts)
        state = {k: v for k, v in state.items() if not k.startswith("readouts.")}
        state.update({"readouts." + k: v for k, v in readouts.items()})

    args: Dict[str, Any] = mace_args.constructor_args(trunk.mace)
    args["use_reduced_cg"] = mace_args.reduced_cg(trunk.mace)
    n_heads = len(args["heads"])
    head = trunk.head_index
    # the file's own per-head values (a plain MACE: scale 1, shift 0); the trained
    # head gets the target's
    energies = np.atleast_2d(args["atomic_energies"]).astype(np.float64)
    scales = np.atleast_1d(args.get("atomic_inter_scale", np.ones(n_heads)))
    shifts = np.atleast_1d(args.get("atomic_inter_shift", np.zeros(n_heads)))
    scales, shifts = scales.astype(np.float64), shifts.astype(np.float64)
    composition = _composition(model, target)
    elements = foundation.atomic_numbers(trunk.mace)
    energies[head] = [composition.get(z, 0.0) for z in elements]
    scale = _scale(model, target)
    scales[head], shifts[head] = scale, 0.0
    if n_heads == 1:
        args["atomic_energies"] = energies[0]
        args["atomic_inter_scale"], args["atomic_inter_shift"] = scale, 0.0
    else:
        args["atomic_energies"] = energies
        args["atomic_inter_scale"], args["atomic_inter_shift"] = scales, shifts
    with float64_default():
        mace = mace_modules.ScaleShiftMACE(**args)

    fresh = mace.state_dict()
    weights = {k: v for k, v in state.items() if k in fresh and k not in BASELINE_KEYS}
    missing = sorted(set(fresh) - set(weights) - set(BASELINE_KEYS))
    if missing:
        raise ValueError(
            f"cannot write this model as a MACE file: no weights for {missing}"
        )
    mace.load_state_dict(weights, strict=False)

    if hasattr(mace, "joint_embedding"):
        logging.info(
            "The MACE file reads the total charge and spin (atoms.info['charge'], "
            "['spin'] in MACECalculator); not every MACE engine does: symmetrix-xl "
            "0.1.1 ignores them (measured: 4 eV off on a charged model)"
        )
    # MACE adds its charge/spin embedding readout unscaled; this model scales it
    factor = scale * float(trunk.embedding_energy_factor)
    if hasattr(mace, "embedding_readout") and factor != 1.0:
        _scale_embedding_readout(mace.embedding_readout, head, n_heads, factor)

    mace = mace.to(getattr(torch, dtype)).eval()
    mace.metatrain_mace_version = __version__
    mace.mace_torch_version = mace_version()
    mace.written_by = (
        f"metatrain-mace {__version__} (mace-torch {mace.mace_torch_version}), "
        f"target '{target}'"
    )
    return mace


def _scale_embedding_readout(
    readout: torch.nn.Module, head: int, n_heads: int, factor: float
) -> None:
    """Multiply the energy of ``head`` in MACE's embedding readout by ``factor``."""
    linear = getattr(readout, "linear", None)
    if linear is None or not hasattr(linear, "weight"):
        raise ValueError(
            f"cannot rescale a charge/spin embedding readout of type "
            f"{type(readout).__name__}: only a linear readout can be written"
        )
    with torch.no_grad():
        weight = linear.weight.view(-1, n_heads)
        weight[:, head] *= factor


def load_source(path: str) -> MetaMACE:
    """A checkpoint (``.ckpt``) of this architecture or a model exported by this
    package (``.pt``), as a Python model."""
    from metatrain_mace.tools.provenance import load_trained

    model = load_trained(path, "can be written as MACE files")
    if model is None:
        raise ValueError(
            f"{path!r} is neither a checkpoint (.ckpt, written by mtt train) nor a "
            "model exported by metatrain-mace (.pt)"
        )
    return model


def write_mace_file(
    path: str,
    output: str,
    head: Optional[str] = None,
    dtype: str = "float64",
) -> torch.nn.Module:
    """Write the energy part of the model at ``path`` as a mace-torch file.

    :param path: a checkpoint (``.ckpt``) or an exported model (``.pt``).
    :param output: the MACE model file to write (written whole or not at all).
    :param head: the energy target to write (see :func:`to_mace_module`).
    :param dtype: ``"float64"`` or ``"float32"``.
    :return: the written module.
    """
    mace = to_mace_module(load_source(path), target=head, dtype=dtype)
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    atomic_save(mace, output)
    return mace


__all__ = ["load_source", "readout_targets", "to_mace_module", "write_mace_file"]
