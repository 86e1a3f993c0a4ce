"""Import hook that makes ``metatrain.experimental.mace`` resolve to ``metatrain_mace``.

metatrain >= 2025.12 ships its own ``metatrain/experimental/mace`` package and finds
architectures only by importing ``metatrain.<name>``. This tiny module, imported at
interpreter start by ``metatrain_mace_hook.pth``, puts a finder at the front of
``sys.meta_path`` that answers every ``metatrain.experimental.mace[.*]`` import with
the *same module object* as the corresponding ``metatrain_mace[.*]`` module, so that
classes are not duplicated and checkpoints, ``isinstance`` checks and pickles agree.

The same finder teaches metatrain which process is the main one under ``torchrun``
(see :func:`is_main_process`), so that distributed runs started that way log, write
checkpoints and export once, checks ``--restart`` files of ``experimental.mace``
runs before metatrain unpickles them, and refuses checkpoints of metatrain's own
``experimental.mace`` clearly (:mod:`metatrain_mace.checkpoints`).

It must stay cheap: it imports nothing but the standard library, and the aliased
package is only imported when someone asks for it. Set ``METATRAIN_MACE_DISABLE=1``
to leave metatrain's own copy in place.
"""

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
from types import ModuleType
from typing import Any, Callable, Optional, Sequence


ALIAS = "metatrain.experimental.mace"
TARGET = "metatrain_mace"
DISABLE_VARIABLE = "METATRAIN_MACE_DISABLE"
MAIN_PROCESS_MODULE = "metatrain.utils.distributed.logging"
TRAIN_MODULE = "metatrain.cli.train"
IO_MODULE = "metatrain.utils.io"
ASE_WRITER_MODULE = "metatrain.utils.data.writers.ase"
EVAL_MODULE = "metatrain.cli.eval"
READER_MODULE = "metatrain.utils.data.readers.ase"


def _target_name(fullname: str) -> Optional[str]:
    if fullname == ALIAS:
        return TARGET
    if fullname.startswith(ALIAS + "."):
        return TARGET + fullname[len(ALIAS) :]
    return None


class _AliasLoader(importlib.abc.Loader):
    """Loader returning an already importable ``metatrain_mace`` module unchanged."""

    def __init__(self, target: str) -> None:
        self.target = target
        self._original_spec: Optional[importlib.machinery.ModuleSpec] = None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        module = importlib.import_module(self.target)
        self._original_spec = module.__spec__
        return module

    def exec_module(self, module: ModuleType) -> None:
        # importlib overwrote ``__spec__`` with the alias spec: put the real one back
        # so that the module keeps a single identity (name, spec, file).
        if self._original_spec is not None:
            module.__spec__ = self._original_spec


def is_main_process_with_rank(original: Callable[[], bool]) -> Callable[[], bool]:
    """metatrain's ``is_main_process``, also right under ``torchrun``.

    metatrain only knows SLURM's ``SLURM_PROCID``; under ``torchrun`` (which sets
    ``RANK`` for each process, also inside a one-task SLURM job) every process
    would create an output folder, log, and write and export the final model. A
    ``RANK`` in the environment decides first.
    """

    def is_main_process() -> bool:
        rank = os.environ.get("RANK")
        if rank is not None:
            return rank.strip() == "0"
        return original()

    is_main_process.__doc__ = original.__doc__
    is_main_process.__wrapped__ = original  # type: ignore[attr-defined]
    return is_main_process


def train_model_checking_restart(original: Callable[..., Any]) -> Callable[..., Any]:
    """metatrain's ``train_model``, refusing bad ``--restart`` files clearly.

    metatrain unpickles the restart file before any code of this package runs, so
    a truncated file or a checkpoint of another kind ends in a bare unpickling
    error or a ``KeyError``. For ``experimental.mace`` runs the file is checked
    first (``metatrain_mace.checkpoints.check_restart_file``), and the error
    names the file and the newest intact checkpoint beside it.
    """

    def train_model(*args: Any, **kwargs: Any) -> Any:
        restart_from = kwargs.get("restart_from")
        options = kwargs.get("options", args[0] if args else None)
        try:
            name = options["architecture"]["name"]  # type: ignore[index]
        except (KeyError, TypeError):
            name = None
        if restart_from is not None and name == ALIAS[len("metatrain.") :]:
            from metatrain_mace.checkpoints import check_restart_file

            check_restart_file(restart_from)
        return original(*args, **kwargs)

    train_model.__doc__ = original.__doc__
    train_model.__wrapped__ = original  # type: ignore[attr-defined]
    return train_model


def model_from_checkpoint_refusing_intree(
    original: Callable[..., Any],
) -> Callable[..., Any]:
    """metatrain's ``model_from_checkpoint``, refusing checkpoints of metatrain's
    in-tree ``experimental.mace`` with the cause and ``METATRAIN_MACE_DISABLE=1``
    (:mod:`metatrain_mace.checkpoints`) instead of a wrong version message."""

    def model_from_checkpoint(checkpoint: Any, *args: Any, **kwargs: Any) -> Any:
        if not is_disabled():
            from metatrain_mace.checkpoints import refuse_intree_checkpoint

            refuse_intree_checkpoint(checkpoint)
        return original(checkpoint, *args, **kwargs)

    model_from_checkpoint.__doc__ = original.__doc__
    model_from_checkpoint.__wrapped__ = original  # type: ignore[attr-defined]
    return model_from_checkpoint


def ase_writer_for_several_blocks(original: Any) -> Any:
    """metatrain's ``ASEWriter`` (the xyz writer of ``mtt eval``), also for outputs
    of several blocks: each block is written as an output of its own
    (:mod:`metatrain_mace.tools.predictions`), where metatrain refuses them. Without
    ``targets``, ``mtt eval`` asks a model for every output it has, and those of this
    package include ``mtt::aux::mace_features`` (one block per irrep)."""

    class ASEWriter(original):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            if self.capabilities is not None:
                from metatrain_mace.tools.predictions import OutputQuantities

                self.capabilities = OutputQuantities(self.capabilities)

        def write(self, systems: Any, predictions: Any) -> None:
            from metatrain_mace.tools.predictions import single_blocks

            super().write(systems, single_blocks(systems, predictions))

    ASEWriter.__doc__ = original.__doc__
    ASEWriter.__module__ = original.__module__
    ASEWriter.__wrapped__ = original  # type: ignore[attr-defined]
    return ASEWriter


def eval_targets_with_forces(original: Callable[..., Any]) -> Callable[..., Any]:
    """metatrain's ``_eval_targets`` (the evaluation loop of ``mtt eval``), asking
    energies with their gradients also when ``eval.yaml`` gives no targets, so that
    predictions on new structures hold forces and stress
    (:mod:`metatrain_mace.tools.predictions`)."""

    def _eval_targets(model: Any, dataset: Any, options: Any, *args, **kwargs) -> Any:
        from metatrain_mace.tools.predictions import with_energy_gradients

        return original(model, dataset, with_energy_gradients(options), *args, **kwargs)

    _eval_targets.__doc__ = original.__doc__
    _eval_targets.__wrapped__ = original  # type: ignore[attr-defined]
    return _eval_targets


def read_energy_checking_gradients(
    original: Callable[..., Any],
) -> Callable[..., Any]:
    """metatrain's ``read_energy`` (of ASE-readable files), refusing forces,
    stress or virial that it dropped for a whole file because their key is
    misspelt or some structures lack them, where metatrain only warns
    (``metatrain_mace.train.datachecks.check_energy_gradients``)."""

    def read_energy(target_name: str, target: Any, *args: Any, **kwargs: Any) -> Any:
        result = original(target_name, target, *args, **kwargs)
        from metatrain_mace.train.datachecks import check_energy_gradients

        check_energy_gradients(target, result[1])
        return result

    read_energy.__doc__ = original.__doc__
    read_energy.__wrapped__ = original  # type: ignore[attr-defined]
    return read_energy


WRAPPERS = {
    READER_MODULE: ("read_energy", read_energy_checking_gradients),
    EVAL_MODULE: ("_eval_targets", eval_targets_with_forces),
    MAIN_PROCESS_MODULE: ("is_main_process", is_main_process_with_rank),
    ASE_WRITER_MODULE: ("ASEWriter", ase_writer_for_several_blocks),
    TRAIN_MODULE: ("train_model", train_model_checking_restart),
    IO_MODULE: ("model_from_checkpoint", model_from_checkpoint_refusing_intree),
}


class _WrappingLoader(importlib.abc.Loader):
    """Runs one of metatrain's modules, then wraps one of its functions
    (:data:`WRAPPERS`)."""

    def __init__(self, loader: importlib.abc.Loader, fullname: str) -> None:
        self.loader = loader
        self.fullname = fullname

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> Any:
        return self.loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self.loader.exec_module(module)
        attribute, wrapper = WRAPPERS[self.fullname]
        original = getattr(module, attribute, None)
        if original is not None and not hasattr(original, "__wrapped__"):
            setattr(module, attribute, wrapper(original))


class MetatrainMaceFinder(importlib.abc.MetaPathFinder):
    """Finder aliasing ``metatrain.experimental.mace[.*]`` to ``metatrain_mace[.*]``;
    it also wraps metatrain's ``is_main_process`` (:func:`is_main_process_with_rank`)
    and ``train_model`` (:func:`train_model_checking_restart`).
    """

    def find_spec(
        self,
        fullname: str,
        path: Optional[Sequence[str]] = None,
        target: Optional[ModuleType] = None,
    ) -> Optional[importlib.machinery.ModuleSpec]:
        if fullname in WRAPPERS:
            spec = importlib.machinery.PathFinder.find_spec(fullname, path)
            if spec is not None and spec.loader is not None:
                spec.loader = _WrappingLoader(spec.loader, fullname)
            return spec
        target_name = _target_name(fullname)
        if target_name is None:
            return None
        if importlib.util.find_spec(target_name) is None:
            return None
        is_package = fullname == ALIAS or target_name.count(".") == 0
        spec = importlib.machinery.ModuleSpec(
            fullname, _AliasLoader(target_name), is_package=is_package
        )
        return spec


def is_disabled() -> bool:
    """Whether the user asked to keep metatrain's own ``experimental.mace``."""
    return os.environ.get(DISABLE_VARIABLE, "").strip().lower() not in (
        "",
        "0",
        "false",
        "no",
    )


def is_installed() -> bool:
    """Whether the alias finder is currently active in ``sys.meta_path``."""
    return any(isinstance(finder, MetatrainMaceFinder) for finder in sys.meta_path)


def install(force: bool = False) -> bool:
    """Put the alias finder at the front of ``sys.meta_path``.

    :param force: install even when ``METATRAIN_MACE_DISABLE`` is set.
    :return: whether the finder is active after the call.
    """
    if is_disabled() and not force:
        return False
    if not is_installed():
        sys.meta_path.insert(0, MetatrainMaceFinder())
        # a previous import of metatrain's own copy must not shadow the alias
        for name in list(sys.modules):
            if _target_name(name) is not None and not getattr(
                sys.modules[name], "__name__", ""
            ).startswith(TARGET):
                del sys.modules[name]
    return True
