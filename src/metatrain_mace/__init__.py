"""MACE as the ``experimental.mace`` architecture of metatrain.

metatrain reads ``__model__`` and ``__trainer__`` from this package (reached as
``metatrain.experimental.mace`` through :mod:`metatrain_mace_hook`). They are
imported lazily so that ``metatrain_mace.documentation`` (the hyperparameters) can be
read without importing torch or mace.
"""

from typing import Any

from metatrain_mace._version import __version__


__authors__ = [("metatrain-mace developers", "@metatrain-mace")]
__maintainers__ = [("metatrain-mace developers", "@metatrain-mace")]


def __getattr__(name: str) -> Any:
    if name in ("__model__", "MetaMACE"):
        from metatrain_mace.model import MetaMACE

        return MetaMACE
    if name in ("__trainer__", "Trainer"):
        from metatrain_mace.trainer import Trainer

        return Trainer
    if name == "export_mace_model":
        from metatrain_mace.tools.export import export_mace_model

        return export_mace_model
    if name == "__capabilities__":
        from metatrain_mace.model import MetaMACE

        return {
            "supported_devices": MetaMACE.__supported_devices__,
            "supported_dtypes": MetaMACE.__supported_dtypes__,
        }
    raise AttributeError(f"module 'metatrain_mace' has no attribute {name!r}")


def register(force: bool = True) -> bool:
    """Make ``metatrain.experimental.mace`` resolve to this package.

    The ``.pth`` hook does this at interpreter start; call this in environments that
    skip ``.pth`` files (embedded interpreters, ``python -S``).

    :param force: register even when ``METATRAIN_MACE_DISABLE`` is set.
    :return: whether the alias is active.
    """
    import metatrain_mace_hook

    return metatrain_mace_hook.install(force=force)


__all__ = ["MetaMACE", "Trainer", "__version__", "export_mace_model", "register"]
