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
from helpers.datasets import make_alloy, make_molecules


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


# the longest modules (minutes on one core), longest first: each runs several whole
# trainings in subprocesses
LONG_MODULES = (
    "test_docs_run.py",
    "test_distributed.py",
    "test_end_to_end.py",
    "test_foundation_training.py",
    "test_charge_spin.py",
    "test_cueq.py",
    "test_engines.py",
)


def pytest_collection_modifyitems(
    session: pytest.Session, config: pytest.Config, items: list
) -> None:
    """The longest modules first, then the other modules that train (tests marked
    slow), then the rest.

    With ``-n 2 --dist=loadscope`` each module runs whole on one worker, and the
    workers take modules in this order (``--no-loadscope-reorder``): the long
    modules start early and the short ones fill in at the end, so that neither
    worker waits long for the other at the end of the run. The order within a
    module is kept.
    """
    weight: dict = {}
    for item in items:
        module = item.nodeid.split("::")[0]
        slow = item.get_closest_marker("slow") is not None
        weight[module] = weight.get(module, 0) + (60 if slow else 1)
    for module in weight:
        name = module.rsplit("/", 1)[-1]
        if name in LONG_MODULES:
            weight[module] += 10**6 * (len(LONG_MODULES) - LONG_MODULES.index(name))
    position = {item.nodeid: i for i, item in enumerate(items)}
    items.sort(
        key=lambda item: (-weight[item.nodeid.split("::")[0]], position[item.nodeid])
    )
