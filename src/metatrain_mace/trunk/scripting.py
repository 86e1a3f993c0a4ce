"""Copies of a model for export and TorchScript, leaving the eager model untouched.

metatomic's ``AtomisticModel`` freezes the parameters of the module it wraps, and
e3nn modules must be compiled through ``e3nn.util.jit.compile``, which rewrites the
module tree in place. Deep copies are not an option (MACE's ``EmptyParam`` cannot be
deep-copied, and they would double the memory), so we copy the module *tree*: new
module objects and new ``Parameter`` objects sharing the storage of the originals.
"""

import contextlib
import copy
import warnings
from pathlib import Path
from typing import Any, Dict, Iterator, Optional, Sequence, Tuple, Union

import torch

from metatrain_mace.checkpoints import replaced_atomically
from metatrain_mace.mace_import import e3nn_jit
from metatrain_mace.trunk.gate import ScriptableGate


@contextlib.contextmanager
def quiet_torchscript() -> Iterator[None]:
    """Silence the TorchScript warnings raised while e3nn and MACE modules are
    built, copied and compiled (about 200 per ``mtt train``): torch's deprecation
    notices of ``torch.jit.*`` and the "instance-level annotations" notices of
    e3nn's and MACE's attributes. They say nothing about the user's run; every
    other warning still shows. Also usable as a decorator."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore",
            message=r"`torch\.jit\.\w+` is deprecated",
            category=DeprecationWarning,
        )
        warnings.filterwarnings(
            "ignore",
            message="The TorchScript type system doesn't support instance-level",
            category=UserWarning,
        )
        yield


def _share(parameter: torch.Tensor) -> torch.Tensor:
    # only plain Parameters: subclasses (MACE's always-zero EmptyParam) stay frozen
    if type(parameter) is not torch.nn.Parameter:
        return parameter
    return torch.nn.Parameter(parameter.detach(), requires_grad=parameter.requires_grad)


@quiet_torchscript()
def tree_copy(module: torch.nn.Module) -> torch.nn.Module:
    """New module objects and parameters over the same tensor storage."""
    if isinstance(module, torch.jit.ScriptModule):
        return module
    new = copy.copy(module)
    new._parameters = type(module._parameters)(
        (name, None if p is None else _share(p))
        for name, p in module._parameters.items()
    )
    new._buffers = type(module._buffers)(module._buffers)
    new._modules = type(module._modules)(
        (name, None if child is None else tree_copy(child))
        for name, child in module._modules.items()
    )
    return new


@quiet_torchscript()
def compiled_copy(
    module: torch.nn.Module,
    drop: Sequence[Tuple[str, str]] = (),
    unused_forward: Sequence[str] = (),
) -> torch.nn.Module:
    """A :func:`tree_copy` of ``module`` with its e3nn submodules compiled.

    :param drop: ``(submodule, attribute)`` pairs removed from the copy before it
        is compiled: modules whose code TorchScript cannot compile and whose work
        is done by other modules of the copy (mace-torch's ``joint_embedding``,
        replaced by :class:`metatrain_mace.trunk.conditioning.SystemConditioning`).
    :param unused_forward: submodules whose own ``forward`` the copy never calls
        (the MACE module, whose blocks the trunk runs one by one): not compiled,
        which saves time, and some of mace-torch's (``AtomicDipolesMACE``) cannot
        be.
    """
    new = tree_copy(module)
    for path, name in drop:
        owner = new.get_submodule(path)
        if hasattr(owner, name):
            delattr(owner, name)
    for path in unused_forward:
        _skip_forward(new.get_submodule(path))
    _swap_gates(new)
    return e3nn_jit.compile(new, in_place=True)


#: subclasses whose forward TorchScript skips, by the class they derive from
_SKIPPED_FORWARD: Dict[type, type] = {}


def _skip_forward(module: torch.nn.Module) -> None:
    """Make ``module`` (a copy) an instance of a subclass of its class whose
    ``forward`` TorchScript does not compile (calling it raises)."""
    cls = type(module)
    if cls not in _SKIPPED_FORWARD:

        @torch.jit.unused
        def forward(
            self: torch.nn.Module, data: Dict[str, torch.Tensor]
        ) -> Dict[str, torch.Tensor]:
            raise RuntimeError("the exported model runs the blocks of MACE only")

        _SKIPPED_FORWARD[cls] = type(
            cls.__name__, (cls,), {"forward": forward, "__module__": __name__}
        )
    module.__class__ = _SKIPPED_FORWARD[cls]


def _swap_gates(module: torch.nn.Module) -> None:
    """Replace mace-torch's ``GatedEquivariantBlock`` (the gate of the non-linear
    dipole readouts, which TorchScript cannot compile) by its scriptable twin in a
    copy (:class:`metatrain_mace.trunk.gate.ScriptableGate`, same numbers)."""
    for name, child in list(module.named_children()):
        if type(child).__name__ == "GatedEquivariantBlock" and hasattr(
            child, "_gated_info"
        ):
            setattr(module, name, ScriptableGate(child))
        else:
            _swap_gates(child)


def save_model_atomically(
    model: Any, file: Union[str, Path], collect_extensions: Optional[str] = None
) -> None:
    """``AtomisticModel.save`` through a temporary file beside ``file``
    (:func:`metatrain_mace.checkpoints.replaced_atomically`), with TorchScript's
    warnings silenced: bound as the ``save`` of the models
    :meth:`~metatrain_mace.model.MetaMACE.export` returns, because metatrain writes
    the exported ``model.pt`` of ``mtt train`` with it."""
    from metatomic.torch import AtomisticModel

    with replaced_atomically(file) as temporary, quiet_torchscript():
        AtomisticModel.save(model, str(temporary), collect_extensions)
