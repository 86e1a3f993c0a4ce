"""What an exported model records to be rebuilt in Python, as plain JSON.

An exported (TorchScript) model runs as a whole; tools that look inside the model
(the per-block precision report, :mod:`metatrain_mace.tools.precision`) need the Python
model back. Every export of this package stores, in a string attribute
``provenance`` of the wrapped module, the model hypers, the dataset info (target
layouts as metatensor buffers), the constructor arguments of a trunk that came
from a MACE file, and the fine-tuning record (readout heads, LoRA adapters). The
weights are the exported module's own. Nothing in the record is a pickle: reading
it imports only mace-torch's classes, by name.
"""

import base64
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict

import metatensor.torch as mts
import metatomic.torch  # noqa: F401 (metatomic's TorchScript classes, for torch.jit.load)
import torch
from metatrain.utils.data import DatasetInfo
from metatrain.utils.data.target_info import TargetInfo
from omegaconf import OmegaConf

from metatrain_mace._version import __version__
from metatrain_mace.trunk import mace_args


if TYPE_CHECKING:
    from metatrain_mace.model import MetaMACE

#: version of the record's layout
FORMAT = 1
#: name of the string attribute holding the record in the exported module
ATTRIBUTE = "provenance"


def _plain(value: Any) -> Any:
    """JSON-compatible copy of hypers and configs (OmegaConf containers too)."""
    if OmegaConf.is_config(value):
        value = OmegaConf.to_container(value, resolve=True)
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _target(info: TargetInfo) -> Dict[str, str]:
    layout = mts.save_buffer(info.layout).numpy().tobytes()
    return {
        "quantity": info.quantity,
        "unit": info.unit,
        "description": info.description,
        "layout": base64.b64encode(layout).decode("ascii"),
    }


def _target_info(plain: Dict[str, str]) -> TargetInfo:
    raw = bytearray(base64.b64decode(plain["layout"]))
    layout = mts.load_buffer(torch.frombuffer(raw, dtype=torch.uint8))
    return TargetInfo(
        layout=layout,
        quantity=plain["quantity"],
        unit=plain["unit"],
        description=plain["description"],
    )


def record(model: "MetaMACE") -> str:
    """The record of an e3nn ``model``, as a JSON string."""
    info = model.dataset_info
    trunk, error = None, None
    if model.from_file:
        try:
            trunk = mace_args.record(model.mace)
        except ValueError as err:
            # the export itself must not fail for it: only the rebuild will
            error = str(err)
            logging.info(f"the exported model cannot be rebuilt in Python: {error}")
    return json.dumps(
        {
            "format": FORMAT,
            "written_by": f"metatrain-mace {__version__}",
            "model_hypers": _plain(dict(model.hypers)),
            "dataset_info": {
                "length_unit": info.length_unit,
                "atomic_types": [int(t) for t in info.atomic_types],
                "targets": {k: _target(v) for k, v in info.targets.items()},
                "extra_data": {k: _target(v) for k, v in info.extra_data.items()},
            },
            "mace_trunk": trunk,
            "mace_trunk_error": error,
            "finetune_config": _plain(model.finetune_config),
        }
    )


def read(path: str) -> Dict[str, Any]:
    """The record stored in the exported model at ``path`` (with the module)."""
    exported = torch.jit.load(str(path), map_location="cpu")
    module = getattr(exported, "module", None)
    if module is None or not hasattr(module, ATTRIBUTE):
        raise ValueError(
            f"{str(path)!r} holds no record of its Python model: it was exported by "
            "another architecture or by an earlier metatrain-mace. Give the "
            "checkpoint (.ckpt) or the MACE model file it was exported from, or "
            "export it again with this version"
        )
    plain = json.loads(getattr(module, ATTRIBUTE))
    if plain.get("format") != FORMAT:
        raise ValueError(
            f"{str(path)!r} holds a record of format {plain.get('format')!r}; this "
            f"metatrain-mace reads format {FORMAT}: update metatrain-mace"
        )
    plain["state_dict"] = module.state_dict()
    return plain


def rebuild(path: str) -> "MetaMACE":
    """The Python (e3nn) model of an exported model, with its weights and dtype."""
    from metatrain_mace.model import MetaMACE

    plain = read(path)
    info = plain["dataset_info"]
    dataset_info = DatasetInfo(
        length_unit=info["length_unit"],
        atomic_types=info["atomic_types"],
        targets={k: _target_info(v) for k, v in info["targets"].items()},
        extra_data={k: _target_info(v) for k, v in info["extra_data"].items()},
    )
    if plain.get("mace_trunk_error"):
        raise ValueError(
            f"the MACE trunk of {str(path)!r} could not be recorded at export "
            f"({plain['mace_trunk_error']}): give the checkpoint (.ckpt) or the MACE "
            "model file it was exported from"
        )
    trunk = None
    if plain["mace_trunk"] is not None:
        trunk = mace_args.rebuild(plain["mace_trunk"])
    model = MetaMACE.with_architecture(
        {
            "model_hypers": plain["model_hypers"],
            "dataset_info": dataset_info,
            "mace_trunk": trunk,
        },
        plain["finetune_config"],
    )
    model.set_weights(_weights(model, plain["state_dict"]))
    model.finetune_config = plain["finetune_config"]
    return model.eval()


def _weights(
    model: "MetaMACE", exported: Dict[str, torch.Tensor]
) -> Dict[str, torch.Tensor]:
    """The exported weights under the names of ``model``'s state.

    The exported module also holds buffers the Python model does not save, and
    leaves out modules that export drops whose weights another module shares
    (MACE's charge/spin embedding, shared with ``conditioning``)."""
    state = model.state_dict()
    shared = {
        value.data_ptr(): exported[key]
        for key, value in state.items()
        if key in exported and value.numel() > 0
    }
    weights: Dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key in exported:
            weights[key] = exported[key]
        elif value.numel() > 0 and value.data_ptr() in shared:
            weights[key] = shared[value.data_ptr()]
        else:
            raise ValueError(f"the exported model has no weights for {key!r}")
    return weights


def is_exported(path: Path) -> bool:
    """Whether ``path`` is a TorchScript archive (an exported model)."""
    import zipfile

    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("constants.pkl") for name in archive.namelist())


__all__ = ["ATTRIBUTE", "is_exported", "read", "rebuild", "record"]
