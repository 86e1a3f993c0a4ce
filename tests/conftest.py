"""Shared fixtures: generated datasets (built once per test session).

Building a MACE model spends most of its time computing the coupling (U) matrices of
the symmetric contractions, which depend only on the irreps and the correlation
order. The suite builds hundreds of small models with a handful of irreps sets, so
those matrices are memoised here (and handed out as copies). This only speeds the
tests up; the package itself is unchanged.
"""

import functools
import os
from pathlib import Path

import pytest
import torch
from mace.modules import symmetric_contraction

import metatrain_mace.mace_import  # noqa: F401  (imports mace safely)
from datasets import make_alloy, make_molecules


def _memoise_u_matrices() -> None:
    original = symmetric_contraction.U_matrix_real

    @functools.cache
    def cached(irreps_in, irreps_out, correlation, **kwargs):
        return original(irreps_in, irreps_out, correlation, **kwargs)

    def U_matrix_real(irreps_in, irreps_out, correlation, **kwargs):
        result = cached(str(irreps_in), str(irreps_out), correlation, **kwargs)
        return [r.clone() if isinstance(r, torch.Tensor) else r for r in result]

    symmetric_contraction.U_matrix_real = U_matrix_real


_memoise_u_matrices()

# with pytest-xdist's workers (``-n 2``) every worker and the commands it starts
# use one thread, so that the workers do not fight over the cores
if "PYTEST_XDIST_WORKER" in os.environ:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def molecules_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("data") / "molecules.xyz"
    return str(make_molecules(path, n_structures=12))


@pytest.fixture(scope="session")
def alloy_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(make_alloy(tmp_path_factory.mktemp("data") / "alloy.xyz"))


@pytest.fixture
def tests_dir() -> Path:
    return Path(__file__).parent
