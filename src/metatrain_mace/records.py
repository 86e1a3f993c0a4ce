"""What an exported model records to be rebuilt in Python, as plain JSON.

An exported (TorchScript) model runs as a whole; tools that look inside the model
(the per-block precision report, :mod:`metatrain_mace.tools.precision`) need the Python
model back (:func:`metatrain_mace.tools.provenance.rebuild`). Every export of this
package stores, in a string attribute ``provenance`` (:data:`ATTRIBUTE`) of the
wrapped module, the model hypers, the dataset info (target layouts as metatensor
buffers), the constructor arguments of a trunk that came from a MACE file, and the
fine-tuning record (readout heads, LoRA adapters). The weights are the exported
module's own. Nothing in the record is a pickle: reading it imports only
mace-torch's classes, by name.
"""

import base64
import json
import logging
from typing import Any, Dict, Optional

import metatensor.torch as mts
import torch
from metatrain.utils.data import DatasetInfo
from metatrain.utils.data.target_info import TargetInfo
from omegaconf import OmegaConf

from metatrain_mace._version import __version__
from metatrain_mace.trunk import mace_args


#: version of the record's layout
FORMAT = 1
#: name of the string attribute holding the record in the exported module
ATTRIBUTE = "provenance"


def plain(value: Any) -> Any:
    """JSON-compatible copy of hypers and configs (OmegaConf containers too)."""
    if OmegaConf.is_config(value):
        value = OmegaConf.to_container(value, resolve=True)
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def _target(info: TargetInfo) -> Dict[str, str]:
    layout = mts.save_buffer(info.layout).numpy().tobytes()
    return {
        "quantity": info.quantity,
        "unit": info.unit,
        "description": info.description,
        "layout": base64.b64encode(layout).decode("ascii"),
    }


def target_info(record: Dict[str, str]) -> TargetInfo:
    """The :class:`TargetInfo` of a target recorded by :func:`record`."""
    raw = bytearray(base64.b64decode(record["layout"]))
    layout = mts.load_buffer(torch.frombuffer(raw, dtype=torch.uint8))
    return TargetInfo(
        layout=layout,
        quantity=record["quantity"],
        unit=record["unit"],
        description=record["description"],
    )


def record(
    hypers: Dict[str, Any],
    dataset_info: DatasetInfo,
    mace: Optional[torch.nn.Module],
    finetune_config: Dict[str, Any],
) -> str:
    """The record of an e3nn model, as a JSON string.

    :param mace: the (e3nn) MACE module of a model loaded from a MACE file,
        ``None`` for a model built from its hypers.
    """
    info = dataset_info
    trunk, error = None, None
    if mace is not None:
        try:
            trunk = mace_args.record(mace)
        except ValueError as err:
            # the export itself must not fail for it: only the rebuild will
            error = str(err)
            logging.info(f"the exported model cannot be rebuilt in Python: {error}")
    return json.dumps(
        {
            "format": FORMAT,
            "written_by": f"metatrain-mace {__version__}",
            "model_hypers": plain(dict(hypers)),
            "dataset_info": {
                "length_unit": info.length_unit,
                "atomic_types": [int(t) for t in info.atomic_types],
                "targets": {k: _target(v) for k, v in info.targets.items()},
                "extra_data": {k: _target(v) for k, v in info.extra_data.items()},
            },
            "mace_trunk": trunk,
            "mace_trunk_error": error,
            "finetune_config": plain(finetune_config),
        }
    )
