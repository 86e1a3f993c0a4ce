"""Import e3nn and mace without leaving torch.load's safe mode switched off.

e3nn 0.4.4 reads a constants file with ``torch.load`` at import time, which fails
under torch >= 2.6 unless ``slice`` is an allowed global; ``import mace`` works around
it by setting ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`` for the whole process. We allow
exactly ``slice`` for the duration of the import instead, and restore the environment
afterwards, so that later ``torch.load`` calls keep their safe default.
"""

import os

import torch


_VARIABLE = "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"


def _import_mace() -> None:
    previous = os.environ.get(_VARIABLE)
    try:
        with torch.serialization.safe_globals([slice]):
            import e3nn.o3  # noqa: F401
            import mace.modules  # noqa: F401
    finally:
        if previous is None:
            os.environ.pop(_VARIABLE, None)
        else:
            os.environ[_VARIABLE] = previous


_import_mace()

import e3nn  # noqa: E402
from e3nn import o3  # noqa: E402
from e3nn.util import jit as e3nn_jit  # noqa: E402
from mace import modules as mace_modules  # noqa: E402


__all__ = ["e3nn", "e3nn_jit", "mace_modules", "o3"]
