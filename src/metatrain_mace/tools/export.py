"""Export a MACE model file directly as a metatomic model (no dataset, no training).

The result behaves exactly like the model ``mtt train`` writes with ``num_epochs: 0``
and the file as ``mace_model``: the same trunk, the file's E0s, shift and scale as
composition baseline and scaler, and every element the file knows.
"""

import tempfile
from pathlib import Path
from typing import Any, Dict, Optional

import torch
from metatomic.torch import AtomisticModel, ModelMetadata
from metatrain.utils.architectures import get_default_hypers
from metatrain.utils.data import DatasetInfo, TargetInfo
from metatrain.utils.data.target_info import (
    get_energy_target_info,
    get_generic_target_info,
)
from omegaconf import OmegaConf

from metatrain_mace.model import ARCHITECTURE_NAME, MetaMACE
from metatrain_mace.train.baselines import fit_baselines
from metatrain_mace.trunk.foundation import atomic_numbers, load_mace_file
from metatrain_mace.trunk.response import OUTPUTS, READOUT_HYPERS, readout_kind


DTYPES = {"float64": torch.float64, "float32": torch.float32}


def mace_file_to_model(
    path: str,
    head: Optional[str] = None,
    dtype: str = "float64",
    energy_unit: str = "eV",
    length_unit: str = "angstrom",
    source: str = "'path'",
    checkpoint_advice: str = (
        "to export a checkpoint written by mtt train, use 'mtt export CHECKPOINT'."
    ),
) -> MetaMACE:
    """A :class:`MetaMACE` predicting the energy of one head of a MACE model file
    (or the outputs of the readouts of a dipole class: dipole, polarizability).

    :param path: the MACE model file (a pickle: only trusted files).
    :param head: head of a multi-head file; ``None`` for single-head files.
    :param dtype: ``"float64"`` or ``"float32"``.
    :param energy_unit: unit of the file's energies (mace-torch works in eV).
    :param length_unit: unit of the file's lengths (mace-torch works in Å).
    :param source: where the user named the file, for the messages.
    :param checkpoint_advice: what to do when the file is a checkpoint.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
    mace = load_mace_file(path, source, checkpoint_advice)
    hypers = get_default_hypers(ARCHITECTURE_NAME)
    hypers["model"].update({"mace_model": str(path), "mace_head_name": head})
    dataset_info = DatasetInfo(
        length_unit=length_unit,
        atomic_types=atomic_numbers(mace),
        targets=readout_target_infos(readout_kind(mace), hypers["model"], energy_unit),
    )
    model = MetaMACE(hypers["model"], dataset_info, mace=mace)
    model.to(DTYPES[dtype])
    training = dict(hypers["training"])
    training["batch_size"] = 1
    # metatrain writes the baselines' checkpoints: not into the user's folder
    with tempfile.TemporaryDirectory() as folder:
        fit_baselines(model, training, train_datasets=[], checkpoint_dir=folder)
    return model.eval()


def readout_target_infos(
    kind: str, model_hypers: Dict[str, Any], energy_unit: str
) -> Dict[str, TargetInfo]:
    """The targets of the outputs of MACE's readouts of ``kind`` (see
    :mod:`metatrain_mace.trunk.response`), named by the ``mace_*_target`` hypers:
    the energy with forces and stress, per-structure Cartesian dipoles and
    polarizabilities (in the file's units, which mace-torch does not record)."""
    targets: Dict[str, TargetInfo] = {}
    for output in OUTPUTS[kind]:
        name = model_hypers[READOUT_HYPERS[output]]
        if output == "energy":
            targets[name] = get_energy_target_info(
                name,
                OmegaConf.create({"quantity": "energy", "unit": energy_unit}),
                add_position_gradients=True,
                add_strain_gradients=True,
            )
            continue
        rank = 1 if output == "dipole" else 2
        targets[name] = get_generic_target_info(
            name,
            OmegaConf.create(
                {
                    "quantity": "",
                    "unit": "",
                    "type": {"cartesian": {"rank": rank}},
                    "sample_kind": "system",
                    "num_subtargets": 1,
                    "description": f"the {output} of MACE's readouts",
                }
            ),
        )
    return targets


def export_mace_model(
    path: str,
    output: Optional[str] = None,
    head: Optional[str] = None,
    dtype: str = "float64",
    metadata: Optional[ModelMetadata] = None,
    source: str = "'path'",
) -> AtomisticModel:
    """Export a MACE model file as a metatomic model, and save it to ``output``.

    :param path: the MACE model file (a pickle: only trusted files).
    :param output: where to save the TorchScript model (``.pt``); ``None`` only
        returns it.
    :param head: head of a multi-head file; ``None`` for single-head files.
    :param dtype: ``"float64"`` or ``"float32"``.
    :param metadata: metadata of the exported model.
    :param source: where the user named the file, for the messages.
    :return: the exported model.
    """
    model = mace_file_to_model(path, head=head, dtype=dtype, source=source)
    exported = model.export(metadata)
    if output is not None:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        exported.save(str(output))  # atomic: see MetaMACE.export
    return exported
