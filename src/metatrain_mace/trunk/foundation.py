"""MACE model files (pretrained and foundation models) as the trunk of the model.

A MACE model file is a whole ``torch.nn.Module`` pickled by mace-torch
(``torch.save(model)``): a ``MACE`` or ``ScaleShiftMACE``, with one or several heads,
maybe with ZBL pair repulsion. Loading one executes the code stored in the pickle,
so only the file the user named in ``mace_model`` (or on the command line) is ever
loaded. The MACE module becomes the trunk as it is; its isolated-atom energies (E0s)
and its scale and shift become metatrain's composition baseline and scaler weights,
so that the wrapped model reproduces MACE's energies.
"""

import logging
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch

from metatrain_mace.checkpoints import is_intact
from metatrain_mace.mace_import import mace_modules, o3
from metatrain_mace.trunk import foundation_names
from metatrain_mace.trunk.conditioning import check_specs
from metatrain_mace.trunk.mace_args import constructor_args
from metatrain_mace.trunk.response import READOUT_HYPERS, READOUT_KINDS
from metatrain_mace.trunk.scripting import quiet_torchscript


# model hyperparameters that describe the MACE architecture: a MACE file fixes them
ARCHITECTURE_HYPERS = [
    "r_max",
    "num_radial_basis",
    "radial_type",
    "num_cutoff_basis",
    "max_ell",
    "interaction",
    "interaction_first",
    "num_interactions",
    "hidden_irreps",
    "edge_irreps",
    "apply_cutoff",
    "avg_num_neighbors",
    "pair_repulsion",
    "distance_transform",
    "correlation",
    "gate",
    "MLP_irreps",
    "radial_MLP",
    "embedding_specs",
    "use_embedding_readout",
    "use_last_readout_only",
    "use_agnostic_product",
]


CHECKPOINT_ADVICE = (
    "to continue from a metatrain checkpoint use 'finetune: read_from' or "
    "'mtt train --restart' instead."
)
"""What to do with a checkpoint given where a MACE file is needed, in ``mtt train``."""


#: MACE model classes whose extra parts this package does not run (yet): loaded
#: as a plain MACE they would silently lose them
NOT_SUPPORTED = {
    "MACELES": "latent Ewald summation (MACELES) adds a long-range energy computed "
    "by the 'les' package",
    "PolarMACE": "PolarMACE (MACE-POLAR-1) adds long-range electrostatics, charges "
    "and fields computed by the 'graph-longrange' package",
}

#: the modules that the pickles of those classes need, and how to get them
MISSING_PACKAGES = {
    "les": "MACELES files need the 'les' package, which is not on PyPI and carries a "
    "non-commercial licence (CC-BY-NC-4.0), so metatrain-mace does not install "
    "it; install it yourself if its licence suits you: pip install "
    "git+https://github.com/ChengUCB/les",
    "graph_longrange": "PolarMACE files (MACE-POLAR-1) need the 'graph-longrange' "
    "package (pip install graph-longrange==0.4.0, the version mace-torch 0.3.16 "
    "works with)",
}


def _refuse_unsupported(loaded: torch.nn.Module, path: str, source: str) -> None:
    """Refuse the MACE classes of :data:`NOT_SUPPORTED`, naming what they add."""
    name = type(loaded).__name__
    if name in NOT_SUPPORTED and type(loaded).__module__.startswith("mace."):
        raise ValueError(
            f"{path!r} ({source}) holds a {name}: {NOT_SUPPORTED[name]}, which "
            "metatrain-mace does not run yet; loading it as a plain MACE would "
            "silently drop that part. Use mace-torch's MACECalculator for this "
            "model. Supported: MACE and ScaleShiftMACE files (one or several "
            "heads, ZBL, charge/spin embeddings), AtomicDipolesMACE, "
            "AtomicDielectricMACE and EnergyDipolesMACE files."
        )


@quiet_torchscript()
def load_mace_file(
    path: str,
    source: str = "'mace_model'",
    checkpoint_advice: str = CHECKPOINT_ADVICE,
) -> torch.nn.Module:
    """Load a whole pickled MACE module (float32 or float64) on the CPU.

    :param path: the MACE model file named by the user.
    :param source: where the user named it, for the messages (the hyper of
        ``mtt train``, or the argument of a command).
    :param checkpoint_advice: what to do when the file is a checkpoint.
    :raises FileNotFoundError: when there is no such file.
    :raises ValueError: when the file does not hold a MACE model.
    """
    file = Path(path)
    if not file.is_file() and foundation_names.looks_like_a_name(str(path)):
        file = foundation_names.fetch(foundation_names.resolve(str(path)))
    if not file.is_file():
        raise FileNotFoundError(
            f"MACE model file {str(path)!r} does not exist (from {source}); give "
            "the path of a model file written by mace-torch, e.g. "
            "'mace-mp-0-medium.model'"
        )
    logging.info(
        f"Loading the MACE model file {str(file)!r} (a pickle: only load files you "
        "trust)"
    )
    try:
        # a whole pickled module cannot be loaded with weights_only=True; this is the
        # one file the user asked for
        loaded = torch.load(file, map_location="cpu", weights_only=False)
    except ModuleNotFoundError as err:
        if err.name in MISSING_PACKAGES:
            raise ValueError(
                f"{str(path)!r} ({source}) cannot be read without the module "
                f"'{err.name}': {MISSING_PACKAGES[err.name]}"
            ) from err
        raise ValueError(_unreadable(file, source, err)) from err
    except Exception as err:
        raise ValueError(_unreadable(file, source, err)) from err
    if isinstance(loaded, dict):
        keys = list(loaded.keys())[:5]
        raise ValueError(
            f"{str(path)!r} ({source}) holds a dict (keys {keys}...), such as a "
            "state dict or a checkpoint, not a MACE model. A MACE model file is a "
            f"whole model saved with torch.save(model); {checkpoint_advice}"
        )
    _refuse_unsupported(loaded, str(path), source)
    supported = tuple(getattr(mace_modules, name) for name in READOUT_KINDS)
    if not isinstance(loaded, supported):
        raise ValueError(
            f"{str(path)!r} ({source}) holds a {type(loaded).__module__}."
            f"{type(loaded).__qualname__}, not a MACE model "
            "(mace.modules.MACE, ScaleShiftMACE or one of the dipole classes): "
            "give a model file written by mace-torch."
        )
    if hasattr(loaded, "joint_embedding"):
        check_specs(dict(loaded.embedding_specs), repr(str(path)))
    _make_trainable(loaded, str(path))
    return loaded.eval()


def _make_trainable(mace: torch.nn.Module, path: str) -> None:
    """Every parameter of the file trains unless the training hypers freeze it.

    mace-torch saves some files with ``requires_grad=False`` on all parameters
    (``mace_run_train``'s stage-two model, ``*_stagetwo.model``); kept as they are,
    full training from such a file would train nothing of MACE."""
    frozen = [name for name, p in mace.named_parameters() if not p.requires_grad]
    if frozen:
        logging.info(
            f"{len(frozen)} parameters of {path!r} were saved with "
            "requires_grad=False (as mace_run_train saves its stage-two model); "
            "they train here unless 'frozen_layers', 'lr_factors' or 'finetune' "
            "freeze them"
        )
    mace.requires_grad_(True)


def _unreadable(file: Path, source: str, error: Exception) -> str:
    """Why ``torch.load`` could not read ``file``: a torch file (a zip archive)
    cut short, or no torch file at all."""
    with open(file, "rb") as stream:
        start = stream.read(4)
    reason = f"torch.load: {type(error).__name__}: {str(error).splitlines()[0]}"
    if start.startswith(b"PK") and not is_intact(file):
        return (
            f"{str(file)!r} ({source}) is cut short: it starts as a file written by "
            "torch.save, but its end is missing, as after an interrupted download "
            f"or copy ({reason}). Download or copy the MACE model file again."
        )
    return (
        f"{str(file)!r} ({source}) is not a MACE model file: torch.load cannot read "
        f"it ({reason}). Give a model file written by mace-torch "
        "(torch.save(model)), e.g. 'mace-mp-0-medium.model'."
    )


def head_names(mace: torch.nn.Module) -> List[str]:
    """Names of the heads of a MACE model (``["Default"]`` for single-head files)."""
    heads = getattr(mace, "heads", None)
    if heads is None:
        return ["Default"]
    return [str(head) for head in heads]


def default_head(mace_model: Optional[str]) -> Optional[str]:
    """The head mace-torch's calculator function picks for a model given by name
    (``omol`` for MACE-OMOL), None otherwise."""
    if mace_model is None or Path(mace_model).is_file():
        return None
    if not foundation_names.looks_like_a_name(mace_model):
        return None
    try:
        model = foundation_names.lookup(mace_model)
    except ValueError:
        return None
    return None if model is None else model.head


def select_head(
    mace: torch.nn.Module, head_name: Optional[str], default: Optional[str] = None
) -> int:
    """Index of the head named ``head_name``.

    Without a name, as mace-torch's calculators choose: ``default`` (the head of a
    named foundation model), the only head, or the head called "default"."""
    names = head_names(mace)
    if head_name is None:
        if len(names) == 1:
            return 0
        candidates = [n for n in names if n == default or n.lower() == "default"]
        if candidates:
            logging.info(
                f"Using the head {candidates[0]!r} of the MACE model (heads "
                f"{names}; choose another with 'mace_head_name')"
            )
            return names.index(candidates[0])
        raise ValueError(
            f"the MACE model has several heads {names}: choose one with "
            "'mace_head_name' (or --head)"
        )
    if head_name not in names:
        raise ValueError(
            f"'mace_head_name' is {head_name!r}, but the MACE model has the heads "
            f"{names}"
        )
    return names.index(head_name)


def atomic_numbers(mace: torch.nn.Module) -> List[int]:
    """The elements a MACE model knows, in the order of its one-hot embedding."""
    return [int(z) for z in mace.atomic_numbers]


def energy_baseline(mace: torch.nn.Module, head: int) -> Tuple[Dict[int, float], float]:
    """Per-element energy offsets and the energy scale of one head of a MACE model.

    MACE's total energy is ``sum_i E0[Z_i] + scale * (readouts_i + pair_i) + shift``.
    The offsets returned are ``E0[Z] + shift`` (metatrain's composition baseline)
    and the scale is metatrain's scaler weight; plain ``MACE`` has scale 1, shift 0.
    """
    energies = torch.atleast_2d(
        mace.atomic_energies_fn.atomic_energies.detach().to(torch.float64)
    )
    row = energies[head] if energies.shape[0] > head else energies[0]
    scale, shift = 1.0, 0.0
    if hasattr(mace, "scale_shift"):
        scale = float(torch.atleast_1d(mace.scale_shift.scale)[head])
        shift = float(torch.atleast_1d(mace.scale_shift.shift)[head])
    offsets = {z: float(row[i]) + shift for i, z in enumerate(atomic_numbers(mace))}
    return offsets, scale


def file_hypers(mace: torch.nn.Module) -> Dict[str, Any]:
    """The architecture hyperparameters that can be read back from a MACE model."""
    args = constructor_args(mace)
    return {
        "r_max": args["r_max"],
        "num_interactions": args["num_interactions"],
        "num_radial_basis": args["num_bessel"],
        "max_ell": args["max_ell"],
        "hidden_irreps": str(args["hidden_irreps"]),
        "correlation": int(np.atleast_1d(args["correlation"])[0]),
        "avg_num_neighbors": args["avg_num_neighbors"],
        "pair_repulsion": bool(args.get("pair_repulsion", False)),
    }


def report_ignored_hypers(
    hypers: Dict[str, Any], defaults: Dict[str, Any], mace: torch.nn.Module
) -> List[str]:
    """Warn about architecture hyperparameters that a MACE file overrides.

    The file decides the architecture: every architecture hyperparameter set to
    something else than its default is ignored, and named in a warning (with the
    file's value when it can be read back).

    :return: the names of the ignored hyperparameters.
    """
    from_file = file_hypers(mace)
    ignored: List[str] = []
    for name in ARCHITECTURE_HYPERS:
        if name not in hypers or hypers[name] == defaults.get(name):
            continue
        value = hypers[name]
        if name == "hidden_irreps":
            try:
                value = str(o3.Irreps(value))
            except (ValueError, AssertionError):
                pass
        if name in from_file and from_file[name] == value:
            continue
        ignored.append(name)
        value = f" (the file has {from_file[name]!r})" if name in from_file else ""
        logging.warning(
            f"'{name}: {hypers[name]!r}' is ignored because 'mace_model' is set: the "
            f"MACE model file fixes the architecture{value}"
        )
    return ignored


def check_dataset(
    mace: torch.nn.Module,
    dataset_info: Any,
    path: str,
    readout_targets: Optional[Dict[str, str]],
) -> None:
    """Refuse datasets the MACE file cannot describe, before any training.

    :param mace: the loaded MACE model.
    :param dataset_info: metatrain's ``DatasetInfo`` of the training data.
    :param path: the file's path, for the messages.
    :param readout_targets: the targets MACE's readouts predict (target name to
        the readouts' output); one of them must be in the dataset (``None`` skips
        this check).
    """
    known = set(atomic_numbers(mace))
    unknown = sorted(int(t) for t in dataset_info.atomic_types if int(t) not in known)
    if unknown:
        raise ValueError(
            f"the dataset contains atomic types {unknown} that the MACE model "
            f"{str(path)!r} does not know (it knows {sorted(known)}); remove these "
            "structures or use a model trained on these elements"
        )
    if readout_targets is None:
        return
    if any(name in dataset_info.targets for name in readout_targets):
        return
    named = ", ".join(
        f"'{READOUT_HYPERS[output]}' is {name!r}"
        for name, output in readout_targets.items()
    )
    what = " and ".join(readout_targets.values())
    raise ValueError(
        f"{named}, but the dataset has no such target (it has "
        f"{sorted(dataset_info.targets)}). MACE's readouts of {str(path)!r} predict "
        f"the {what}: name the dataset's target(s) in these hyperparameters"
    )
