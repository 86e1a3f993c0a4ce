"""The Python model of an exported model, rebuilt from its record.

Every export of this package stores a record of the model (written by
:func:`metatrain_mace.records.record`: hypers, dataset info, the constructor
arguments of a trunk from a MACE file, the fine-tuning record) in the exported
module; :func:`rebuild` reads it and loads the exported module's own weights.
"""

import json
from pathlib import Path
from typing import Any, Dict, Optional

import metatomic.torch  # noqa: F401 (metatomic's TorchScript classes, for torch.jit.load)
import torch
from metatrain.utils.architectures import get_default_hypers
from metatrain.utils.data import DatasetInfo

from metatrain_mace import parameter_names
from metatrain_mace.checkpoints import ARCHITECTURE_NAME
from metatrain_mace.model import MetaMACE
from metatrain_mace.records import ATTRIBUTE, FORMAT, target_info
from metatrain_mace.trunk import mace_args


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


def rebuild(path: str) -> MetaMACE:
    """The Python (e3nn) model of an exported model, with its weights and dtype."""
    plain = read(path)
    info = plain["dataset_info"]
    dataset_info = DatasetInfo(
        length_unit=info["length_unit"],
        atomic_types=info["atomic_types"],
        targets={k: target_info(v) for k, v in info["targets"].items()},
        extra_data={k: target_info(v) for k, v in info["extra_data"].items()},
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
    # hypers added after the export take their defaults (what the model had)
    defaults = get_default_hypers(ARCHITECTURE_NAME)["model"]
    model = MetaMACE.with_architecture(
        {
            "model_hypers": {**defaults, **plain["model_hypers"]},
            "dataset_info": dataset_info,
            "mace_trunk": trunk,
        },
        plain["finetune_config"],
    )
    state_dict = plain["state_dict"]
    if "trunk.avg_num_neighbors" not in state_dict:
        # exported before model version 5, where the trunk had no module of its own
        state_dict = parameter_names.to_version_5(state_dict)
    model.set_weights(_weights(model, state_dict))
    model.finetune_config = plain["finetune_config"]
    return model.eval()


def _weights(
    model: MetaMACE, exported: Dict[str, torch.Tensor]
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

    try:
        with zipfile.ZipFile(path) as archive:
            return any(name.endswith("constants.pkl") for name in archive.namelist())
    except (OSError, zipfile.BadZipFile):
        # not a zip archive, or one cut short: not an exported model
        return False


def load_trained(path: str, purpose: str) -> Optional[MetaMACE]:
    """A model of this package in Python: a model exported by it (``.pt``, rebuilt
    from its record) or a checkpoint (``.ckpt``) of this architecture; ``None`` for
    any other file (a MACE model file, say), for the caller to read.

    :param purpose: what the caller does with it, for the message refusing a
        checkpoint of another architecture.
    :raises FileNotFoundError: when there is no such file.
    """
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"model {path!r} does not exist")
    if is_exported(file):
        return rebuild(str(file))
    if file.suffix != ".ckpt":
        return None
    from metatrain.utils.io import load_model

    model = load_model(str(file))
    if not isinstance(model, MetaMACE):
        raise ValueError(
            f"{path!r} is a checkpoint of another architecture "
            f"({type(model).__name__}); only experimental.mace models of "
            f"metatrain-mace {purpose}"
        )
    return model.eval()


__all__ = ["ATTRIBUTE", "is_exported", "load_trained", "read", "rebuild"]
