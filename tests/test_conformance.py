"""metatrain's architecture conformance suite, run against metatrain-mace.

Every test class of ``metatrain.utils.testing`` is subclassed, with every
``supports_*`` flag left on: the only skipped tests are those that need CUDA.
"""

from pathlib import Path

import pytest
from metatrain.utils.architectures import import_architecture
from metatrain.utils.testing import (
    ArchitectureTests,
    AutogradTests,
    CheckpointTests,
    ExportedTests,
    InputTests,
    OutputTests,
    TorchscriptTests,
    TrainingTests,
)

import metatrain_mace


SMALL_HYPERS = {
    "r_max": 4.0,
    "num_radial_basis": 4,
    "max_ell": 1,
    "num_interactions": 2,
    "hidden_irreps": "4x0e + 4x1o",
    "correlation": 2,
    "MLP_irreps": "4x0e",
    "radial_MLP": [8],
    "head_hidden_sizes": [8],
}

# ordinary hypers, as a new user writes them: the node features carry 0e + 1o + 2e
# only; every other irrep of the spherical tests (0o, 1e, 2o, 3e, 3o, rank-2
# products) is reached by the heads' tensor products (metatrain_mace.heads.products)
SPHERICAL_HYPERS = {
    **SMALL_HYPERS,
    "max_ell": 2,
    "num_interactions": 2,
    "hidden_irreps": "8x0e + 8x1o + 8x2e",
}

MINIMAL_HYPERS = {
    "r_max": 4.0,
    "num_radial_basis": 2,
    "max_ell": 1,
    "num_interactions": 1,
    "hidden_irreps": "2x0e",
    "correlation": 1,
    "MLP_irreps": "2x0e",
    "radial_MLP": [2],
    "head_hidden_sizes": [2],
}


class MACETests(ArchitectureTests):
    architecture = "experimental.mace"

    @pytest.fixture
    def dataset_path(self, molecules_path: str) -> str:
        return molecules_path

    @pytest.fixture
    def model_hypers(self, default_hypers: dict) -> dict:
        return {**default_hypers["model"], **SMALL_HYPERS}

    @pytest.fixture
    def minimal_model_hypers(self, default_hypers: dict) -> dict:
        return {**default_hypers["model"], **MINIMAL_HYPERS}

    @pytest.fixture
    def default_hypers(self) -> dict:
        from metatrain.utils.architectures import get_default_hypers

        hypers = get_default_hypers(self.architecture)
        hypers["training"]["batch_size"] = 4
        hypers["training"]["num_workers"] = 0
        return hypers


def test_architecture_is_this_package() -> None:
    """metatrain resolves experimental.mace to metatrain_mace, not its own copy."""
    architecture = import_architecture("experimental.mace")
    assert architecture is metatrain_mace
    assert architecture.__model__ is metatrain_mace.MetaMACE
    assert Path(architecture.__file__).parent == Path(metatrain_mace.__file__).parent


class TestInput(InputTests, MACETests):
    pass


class TestOutput(OutputTests, MACETests):
    @pytest.fixture
    def model_hypers(self, default_hypers: dict) -> dict:
        return {**default_hypers["model"], **SPHERICAL_HYPERS}

    @pytest.fixture
    def n_features(self) -> int:
        # scalar (0e) features: 8 of each of the 2 layers
        return 16


class TestAutograd(AutogradTests, MACETests):
    pass


class TestTorchscript(TorchscriptTests, MACETests):
    @pytest.fixture
    def model_hypers(self, default_hypers: dict) -> dict:
        return {**default_hypers["model"], **SPHERICAL_HYPERS}


class TestExported(ExportedTests, MACETests):
    pass


@pytest.mark.slow  # metatrain's training runs
class TestTraining(TrainingTests, MACETests):
    pass


class TestCheckpoints(CheckpointTests, MACETests):
    @pytest.fixture(autouse=True)
    def _in_checkpoints_parent(
        self, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
    ) -> None:
        # the suite reads ./checkpoints/*.ckpt.gz and writes model_0.ckpt in the
        # working directory: work in a temporary directory linked to ours
        workdir = tmp_path / "work"
        workdir.mkdir()
        (workdir / "checkpoints").symlink_to(Path(__file__).parent / "checkpoints")
        monkeypatch.chdir(workdir)
