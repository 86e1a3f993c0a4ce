"""Checkpoints of ``experimental.mace``: versions, upgrades, files, foreign ones.

- Versions and upgrades. Each entry of ``MODEL_UPDATES`` / ``TRAINER_UPDATES`` maps
  version ``v`` to a function updating a checkpoint dict from ``v`` to ``v + 1`` in
  place. Version 1 is the first published format; model version 2 adds
  ``model_data["mace_trunk"]``, model version 3 the ``embedding_specs`` hyper, model
  version 4 the ``enable_cueq`` hyper, model version 5 moves the MACE trunk into a
  module of its own (state-dict keys ``mace.*``, ``conditioning.*`` and
  ``avg_num_neighbors`` become ``trunk.mace.*``, ``trunk.conditioning.*`` and
  ``trunk.avg_num_neighbors``; names in the hypers and in ``finetune_config`` keep
  the names of the MACE model, see :mod:`metatrain_mace.parameter_names`), model
  version 6 the ``long_range`` hyper, model version 7 the ``mace_dipole_target``
  and ``mace_polarizability_target`` hypers, trainer
  version 2 the ``frozen_layers`` and
  ``lr_factors`` hypers, trainer version 3 the EMA and stage two of MACE's recipe.
- Files that survive crashes. Every checkpoint and exported model this package
  writes goes first to a hidden temporary file in the same folder, which is renamed
  onto the final name once complete: a crash during a write leaves the previous file
  intact (and a ``.*.tmp`` file that ``--restart auto`` ignores). Before ``mtt train
  --restart FILE`` loads anything, the import hook calls :func:`check_restart_file`,
  which refuses unreadable files and files that are not training checkpoints of
  ``experimental.mace``, naming the newest intact checkpoint to restart from
  instead.
- Checkpoints of metatrain's own ``experimental.mace``. With this package
  installed, ``experimental.mace`` means metatrain-mace, also when metatrain reads a
  checkpoint. metatrain's in-tree copy stores another model under the same name
  (``model_data["hypers"]`` and a MACE under ``mace_model.*``, where this package
  stores ``model_data["model_hypers"]``), with its own version numbers, so that
  metatrain's message for them ("only supports up to version 3 ... upgrade
  metatrain") sends users the wrong way. They are refused with the cause and the way
  out: ``METATRAIN_MACE_DISABLE=1`` hands ``experimental.mace`` back to metatrain.
"""

import contextlib
import logging
import os
import re
import signal
import threading
import zipfile
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Union

import torch

from metatrain_mace import parameter_names
from metatrain_mace.documentation import LONG_RANGE_DEFAULTS


ARCHITECTURE_NAME = "experimental.mace"
"""The name metatrain knows this architecture by, recorded in every checkpoint."""

Update = Callable[[Dict[str, Any]], None]


def _model_v1_to_v2(checkpoint: Dict[str, Any]) -> None:
    """v2 stores the MACE trunk of models loaded from a MACE file (none before)."""
    checkpoint["model_data"]["mace_trunk"] = None


def _model_v2_to_v3(checkpoint: Dict[str, Any]) -> None:
    """v3 has the ``embedding_specs`` hyper (charge/spin conditioning; none
    before)."""
    for key in ("model_data",):
        hypers = checkpoint.get(key, {}).get("model_hypers")
        if hypers is not None:
            hypers.setdefault("embedding_specs", None)


def _trainer_v1_to_v2(checkpoint: Dict[str, Any]) -> None:
    """v2 has ``frozen_layers`` and ``lr_factors``, and one optimizer group per
    block (a v1 optimizer state is reset on restart, with a warning)."""
    hypers = checkpoint.get("train_hypers")
    if hypers is not None:
        hypers.setdefault("frozen_layers", 0)
        hypers.setdefault("lr_factors", {})


def _model_v3_to_v4(checkpoint: Dict[str, Any]) -> None:
    """v4 has the ``enable_cueq`` hyper (cuEquivariance; e3nn before)."""
    hypers = checkpoint.get("model_data", {}).get("model_hypers")
    if hypers is not None:
        hypers.setdefault("enable_cueq", False)


def _model_v4_to_v5(checkpoint: Dict[str, Any]) -> None:
    """v5 holds the MACE trunk in a module of its own: the keys ``mace.*``,
    ``conditioning.*`` and ``avg_num_neighbors`` of the state dicts (and of the
    trainer's weight average) are under ``trunk.`` (see
    :func:`metatrain_mace.parameter_names.to_version_5`)."""
    for key in ("model_state_dict", "best_model_state_dict"):
        if checkpoint.get(key) is not None:
            checkpoint[key] = parameter_names.to_version_5(checkpoint[key])
    # the weight average of the trainer (by parameter name)
    ema = checkpoint.get("ema_state")
    if isinstance(ema, dict) and isinstance(ema.get("average"), dict):
        ema["average"] = parameter_names.to_version_5(ema["average"])


def _model_v5_to_v6(checkpoint: Dict[str, Any]) -> None:
    """v6 has the ``long_range`` hyper (off before)."""
    hypers = checkpoint["model_data"]["model_hypers"]
    hypers.setdefault("long_range", dict(LONG_RANGE_DEFAULTS))


def _model_v6_to_v7(checkpoint: Dict[str, Any]) -> None:
    """v7 has the ``mace_dipole_target`` and ``mace_polarizability_target`` hypers
    (for MACE files of the dipole classes, which earlier versions refused)."""
    hypers = checkpoint["model_data"]["model_hypers"]
    hypers.setdefault("mace_dipole_target", "mtt::dipole")
    hypers.setdefault("mace_polarizability_target", "mtt::polarizability")


MODEL_UPDATES: Dict[int, Update] = {
    1: _model_v1_to_v2,
    2: _model_v2_to_v3,
    3: _model_v3_to_v4,
    4: _model_v4_to_v5,
    5: _model_v5_to_v6,
    6: _model_v6_to_v7,
}


def _trainer_v2_to_v3(checkpoint: Dict[str, Any]) -> None:
    """v3 has MACE's recipe: ``ema_decay`` and the ``stage_two_*`` hypers, and the
    weight average and stage-two scheduler states (none before)."""
    hypers = checkpoint.get("train_hypers")
    if hypers is not None:
        hypers.setdefault("ema_decay", None)
        hypers.setdefault("stage_two_epoch", None)
        hypers.setdefault("stage_two_loss", None)
        hypers.setdefault("stage_two_learning_rate", 1e-3)
    checkpoint.setdefault("ema_state", None)
    checkpoint.setdefault("stage_two_scheduler_state_dict", None)


def _trainer_v3_to_v4(checkpoint: Dict[str, Any]) -> None:
    """v4 records the generation of training defaults the run began under
    (``hyper_defaults``; 3 for every earlier run): a restart keeps the values of
    defaults that changed since (see :mod:`metatrain_mace.train.defaults`)."""
    checkpoint.setdefault("hyper_defaults", 3)


TRAINER_UPDATES: Dict[int, Update] = {
    1: _trainer_v1_to_v2,
    2: _trainer_v2_to_v3,
    3: _trainer_v3_to_v4,
}


def upgrade(
    checkpoint: Dict[str, Any], kind: str, current: int, updates: Dict[int, Update]
) -> Dict[str, Any]:
    """Apply the updates from the checkpoint's ``<kind>_ckpt_version`` on."""
    key = f"{kind}_ckpt_version"
    version = checkpoint[key]
    while version in updates and version < current:
        updates[version](checkpoint)
        version += 1
        checkpoint[key] = version
    if version != current:
        raise RuntimeError(
            f"Unable to upgrade the checkpoint: the checkpoint is using {kind} "
            f"version {checkpoint[key]}, while the current {kind} version is "
            f"{current}."
        )
    return checkpoint


# ------------------------------------------------------------- files
LATEST = "model_latest.ckpt"
"""Rolling checkpoint rewritten after every epoch (and once before the first)."""
BASELINE_FILES = ("composition_model.ckpt", "scaler.ckpt")
"""Checkpoints of metatrain's baselines, written before the first epoch: not
checkpoints of the model."""


TEMPORARY = re.compile(r"^\.(?P<name>.+)\.(?P<pid>[0-9]+)\.tmp$")
"""Names of the temporary files of :func:`replaced_atomically`."""


@contextlib.contextmanager
def replaced_atomically(path: Union[str, Path]) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to; renamed onto ``path`` when
    the block ends normally, removed in any case. A SIGTERM (what SLURM sends
    before it kills a job) that arrives during the write waits for its end: the
    file is then complete, and the process stops as SIGTERM would have stopped
    it, after a log line that says where to restart from."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with _sigterm_after(path):
        try:
            yield temporary
            os.replace(temporary, path)
        finally:
            temporary.unlink(missing_ok=True)


@contextlib.contextmanager
def _sigterm_after(path: Path) -> Iterator[None]:
    """Hold SIGTERM back while the block runs (main thread only: signal handlers
    can only be set there), then deliver it."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: List[int] = []
    previous = signal.signal(signal.SIGTERM, lambda signum, _: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        if received:
            written = path.is_file() and path.suffix == ".ckpt"
            logging.warning(
                f"SIGTERM received while writing '{path}'; the write was finished "
                "first. "
                + (
                    f"Continue the run with `mtt train OPTIONS --restart {path}`."
                    if written
                    else "Continue from the newest checkpoint of the run."
                )
            )
            os.kill(os.getpid(), signal.SIGTERM)


def remove_stale_temporaries(folder: Union[str, Path]) -> List[Path]:
    """Remove the temporary files that killed processes left in ``folder`` (a
    SIGKILL during a write leaves them, as large as the model); files of
    processes still running are kept. Returns the removed files."""
    removed: List[Path] = []
    for candidate in Path(folder).glob(".*.tmp"):
        match = TEMPORARY.match(candidate.name)
        if match is None or _is_running(int(match["pid"])):
            continue
        try:
            size = candidate.stat().st_size
            candidate.unlink()
        except OSError:
            continue
        logging.info(
            f"Removed '{candidate}' ({size / 1e6:.1f} MB), an unfinished write of "
            f"'{match['name']}' by a process that has ended"
        )
        removed.append(candidate)
    return removed


def remove_stale_temporaries_of_runs(folder: Union[str, Path]) -> List[Path]:
    """:func:`remove_stale_temporaries` in a run folder and, when it lies in
    ``outputs/DATE/TIME`` as ``mtt train`` makes them, in the other runs beside
    it."""
    folder = Path(folder)
    folders = [folder]
    runs = folder.resolve().parent.parent
    if runs.name == "outputs":
        folders += [f for f in runs.glob("*/*") if f.is_dir()]
    removed: List[Path] = []
    for candidate in dict.fromkeys(f.resolve() for f in folders):
        removed += remove_stale_temporaries(candidate)
    return removed


def _is_running(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def atomic_save(obj: Any, path: Union[str, Path]) -> None:
    """``torch.save`` to a temporary file beside ``path``, then rename it."""
    with replaced_atomically(path) as temporary:
        with open(temporary, "wb") as file:
            torch.save(obj, file)
            file.flush()
            os.fsync(file.fileno())


def is_intact(path: Path) -> bool:
    """Whether ``path`` is a complete zip archive (``torch.save``'s format), by its
    checksums; nothing is unpickled."""
    try:
        with zipfile.ZipFile(path) as archive:
            return archive.testzip() is None
    except (OSError, zipfile.BadZipFile):
        return False


def newest_intact_checkpoint(path: Path) -> Optional[Path]:
    """The newest intact model checkpoint other than ``path`` in its folder and in
    the other run folders beside it (``outputs/DATE/TIME/``)."""
    folder = path.resolve().parent
    candidates: List[Path] = list(folder.glob("*.ckpt"))
    runs = folder.parent.parent
    if runs.name == "outputs":
        candidates += list(runs.glob("*/*/*.ckpt"))
    candidates = [
        c
        for c in set(candidates)
        if c.resolve() != path.resolve() and c.name not in BASELINE_FILES
    ]
    for candidate in sorted(candidates, key=lambda c: c.stat().st_mtime, reverse=True):
        if is_intact(candidate):
            return candidate
    return None


def _instead(path: Path) -> str:
    previous = newest_intact_checkpoint(path)
    if previous is None:
        return (
            "No intact checkpoint of a model was found beside it: start the "
            "training afresh (without --restart)."
        )
    return (
        f"The newest intact checkpoint beside it is '{previous}': restart from it "
        f"with `mtt train OPTIONS --restart {previous}`."
    )


def check_restart_file(path: Union[str, Path]) -> None:
    """Refuse to restart from a file that is not a readable training checkpoint of
    ``experimental.mace``, naming the file and the checkpoint to use instead.

    The user named this file for ``--restart``: it is loaded as metatrain is
    about to load it (a pickle, so only files you trust)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"the restart checkpoint '{path}' does not exist")
    # unfinished writes of the run that is continued (killed during a write)
    remove_stale_temporaries(path.resolve().parent)
    try:
        checkpoint = torch.load(path, weights_only=False, map_location="cpu")
    except Exception as error:
        raise ValueError(
            f"cannot read the restart checkpoint '{path}' ({type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else ''}); it was probably "
            f"cut short by a crash while it was written. {_instead(path)}"
        ) from None
    architecture = (
        checkpoint.get("architecture_name") if isinstance(checkpoint, dict) else None
    )
    if path.name in BASELINE_FILES or architecture in ("composition", "scaler"):
        raise ValueError(
            f"'{path}' holds only metatrain's {architecture or 'baseline'} fitted "
            "before the first epoch, not a checkpoint of the model (the run "
            f"stopped before one was written). {_instead(path)}"
        )
    if architecture != ARCHITECTURE_NAME:
        raise ValueError(
            f"'{path}' is a checkpoint of the '{architecture}' architecture, not of "
            f"'{ARCHITECTURE_NAME}': --restart continues a run of the same "
            f"architecture. Use `architecture: name: {architecture}` to continue "
            "it, or start a new experimental.mace training without --restart."
        )
    if "optimizer_state_dict" not in checkpoint or "model_data" not in checkpoint:
        raise ValueError(
            f"'{path}' is not a training checkpoint of {ARCHITECTURE_NAME} (it has "
            "no model data or optimizer state). Use an .ckpt file written by "
            f"`mtt train`. {_instead(path)}"
        )


# ------------------------------------------ metatrain's in-tree experimental.mace
def is_intree_checkpoint(checkpoint: Dict[str, Any]) -> bool:
    """Whether ``checkpoint`` was written by metatrain's in-tree
    ``experimental.mace`` (not by this package)."""
    if not isinstance(checkpoint, dict):
        return False
    if checkpoint.get("architecture_name") != "experimental.mace":
        return False
    model_data = checkpoint.get("model_data")
    return (
        isinstance(model_data, dict)
        and "hypers" in model_data
        and "model_hypers" not in model_data
    )


def refuse_intree_checkpoint(checkpoint: Dict[str, Any]) -> None:
    """Raise a clear error for a checkpoint of metatrain's in-tree
    ``experimental.mace``; do nothing for any other checkpoint."""
    if not is_intree_checkpoint(checkpoint):
        return
    version = checkpoint.get("model_ckpt_version", "unknown")
    raise ValueError(
        "this checkpoint was written by metatrain's own 'experimental.mace' "
        f"(its model checkpoint version {version}), not by metatrain-mace, which "
        "is installed and now answers for 'experimental.mace': the two store "
        "different models under the same name. Use metatrain's own copy for it by "
        "setting METATRAIN_MACE_DISABLE=1, for example "
        "'METATRAIN_MACE_DISABLE=1 mtt export model.ckpt' (metatrain's copy works "
        "with the mace-torch version metatrain pins for it), or train a new model "
        "with metatrain-mace"
    )
