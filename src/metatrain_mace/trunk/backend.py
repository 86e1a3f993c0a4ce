"""The one place that decides how the MACE trunk runs: backend and dtype rules.

- Backend: e3nn (always available, TorchScript-able: what exported models run) or
  NVIDIA's cuEquivariance (``enable_cueq``; optional extra, training only). This
  module says whether cuEquivariance is installed, refuses it clearly when it is not,
  gives mace-torch's configuration for it and tells which backend a MACE module
  runs on. The conversion of a module between backends is
  :mod:`metatrain_mace.trunk.cueq`.
- Dtype: MACE and e3nn compute their coupling coefficients in torch's default dtype
  when a module is built or its code generated. Everything is built under
  :func:`float64_default` and cast down afterwards, never the other way round.
"""

import contextlib
from typing import Any, Iterator

import torch


@contextlib.contextmanager
def float64_default() -> Iterator[None]:
    """Make float64 torch's default dtype inside the block (restored afterwards).

    MACE and e3nn compute their coupling coefficients in the default dtype when a
    module is built or its code generated; float64 keeps them exact.
    """
    previous_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(previous_dtype)


INSTALL_HINT = "pip install 'metatrain-mace[cueq]'"


def cueq_available() -> bool:
    """Whether cuequivariance-torch can be imported."""
    try:
        import cuequivariance  # noqa: F401
        import cuequivariance_torch  # noqa: F401
    except ImportError:
        return False
    return True


def require_cueq(what: str = "'enable_cueq: true'") -> None:
    """Refuse cuEquivariance when it is not installed, naming the extra."""
    if not cueq_available():
        raise ImportError(
            f"{what} needs cuequivariance-torch, which is not installed: install it "
            f"with {INSTALL_HINT} (or set 'enable_cueq: false' to use e3nn)"
        )


def cueq_config() -> Any:
    """mace-torch's configuration for a cuEquivariance MACE: every operation on
    cuEquivariance, in its native (irrep, multiplicity) layout, with e3nn's O3
    conventions so that the weights are those of the e3nn model."""
    from mace.modules.wrapper_ops import CuEquivarianceConfig

    return CuEquivarianceConfig(
        enabled=True, layout="ir_mul", group="O3_e3nn", optimize_all=True
    )


def is_cueq(mace: torch.nn.Module) -> bool:
    """Whether a MACE module runs on cuEquivariance (its symmetric contractions
    are cuequivariance-torch modules)."""
    contraction = mace.products[0].symmetric_contractions
    return type(contraction).__module__.startswith("cuequivariance_torch")
