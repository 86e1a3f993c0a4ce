"""Checkpoint files that survive crashes, and restarts that say what went wrong.

Every checkpoint and exported model this package writes goes first to a hidden
temporary file in the same folder, which is renamed onto the final name once
complete: a crash during a write leaves the previous file intact (and a ``.*.tmp``
file that ``--restart auto`` ignores). Before ``mtt train --restart FILE`` loads
anything, the import hook calls :func:`check_restart_file`, which refuses
unreadable files and files that are not training checkpoints of
``experimental.mace``, naming the newest intact checkpoint to restart from
instead.
"""

import contextlib
import os
import zipfile
from pathlib import Path
from typing import Any, Iterator, List, Optional, Union

import torch


ARCHITECTURE_NAME = "experimental.mace"
LATEST = "model_latest.ckpt"
"""Rolling checkpoint rewritten after every epoch (and once before the first)."""
BASELINE_FILES = ("composition_model.ckpt", "scaler.ckpt")
"""Checkpoints of metatrain's baselines, written before the first epoch: not
checkpoints of the model."""


@contextlib.contextmanager
def _replaced_atomically(path: Union[str, Path]) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to; renamed onto ``path`` when
    the block ends normally, removed in any case."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def atomic_save(obj: Any, path: Union[str, Path]) -> None:
    """``torch.save`` to a temporary file beside ``path``, then rename it."""
    with _replaced_atomically(path) as temporary:
        with open(temporary, "wb") as file:
            torch.save(obj, file)
            file.flush()
            os.fsync(file.fileno())


def save_model_atomically(
    model: Any, file: Union[str, Path], collect_extensions: Optional[str] = None
) -> None:
    """``AtomisticModel.save`` through a temporary file beside ``file``: bound as
    the ``save`` of the models :meth:`MetaMACE.export` returns, because metatrain
    writes the exported ``model.pt`` of ``mtt train`` with it."""
    from metatomic.torch import AtomisticModel

    from metatrain_mace.scripting import quiet_torchscript

    with _replaced_atomically(file) as temporary, quiet_torchscript():
        AtomisticModel.save(model, str(temporary), collect_extensions)


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
