"""Bad input gets a clear error before any training starts."""

import copy

import pytest
import torch
from metatomic.torch import ModelOutput, System
from metatrain.utils.architectures import (
    check_architecture_options,
    get_default_hypers,
)
from metatrain.utils.data import DatasetInfo
from metatrain.utils.data.target_info import (
    get_energy_target_info,
    get_generic_target_info,
)
from metatrain.utils.neighbor_lists import get_system_with_neighbor_lists
from metatrain.utils.pydantic import MetatrainValidationError
from omegaconf import OmegaConf

from metatrain_mace import MetaMACE, Trainer


NAME = "experimental.mace"
SMALL = {"hidden_irreps": "4x0e + 4x1o", "radial_MLP": [8], "head_hidden_sizes": [8]}


def hypers(**changes):
    model = get_default_hypers(NAME)["model"]
    model.update(SMALL)
    model.update(changes)
    return model


def energy_info(types=(1, 6)) -> DatasetInfo:
    return DatasetInfo(
        length_unit="angstrom",
        atomic_types=list(types),
        targets={"energy": get_energy_target_info("energy", {"unit": "eV"})},
    )


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("hidden_irreps", "16x0e + 16xq", "invalid irreps for 'hidden_irreps'"),
        ("MLP_irreps", "sixteen", "invalid irreps for 'MLP_irreps'"),
        ("hidden_irreps", "32x0e + 16x1o", "unequal multiplicities \\[16, 32\\]"),
        ("hidden_irreps", "8x1o", "has no scalars"),
        ("r_max", 0.0, "'r_max' must be positive, got 0.0"),
        ("r_max", -1.0, "'r_max' must be positive"),
        ("correlation", 0, "'correlation' must be at least 1, got 0"),
    ],
)
def test_bad_model_hypers(key, value, message) -> None:
    with pytest.raises(ValueError, match=message):
        MetaMACE(hypers(**{key: value}), energy_info())


@pytest.mark.parametrize(
    "model, expected",
    [
        ({"r_max": -1.0}, "r_max"),
        ({"correlation": 0}, "correlation"),
        ({"r_maxx": 5.0}, "Unrecognized option 'r_maxx'"),
        ({"num_interactions": "two"}, "num_interactions"),
    ],
)
def test_validation_names_the_key(model, expected) -> None:
    options = OmegaConf.create({"name": NAME, "model": model, "training": {}})
    with pytest.raises(MetatrainValidationError, match=expected):
        check_architecture_options(NAME, OmegaConf.to_container(options))


def test_rank_three_target_refused() -> None:
    info = DatasetInfo(
        length_unit="angstrom",
        atomic_types=[1, 6],
        targets={
            "mtt::polarizability": get_generic_target_info(
                "mtt::polarizability",
                {
                    "quantity": "",
                    "unit": "",
                    "type": {"cartesian": {"rank": 3}},
                    "num_subtargets": 1,
                    "sample_kind": "system",
                },
            )
        },
    )
    with pytest.raises(ValueError, match="'mtt::polarizability' is a tensor of rank 3"):
        MetaMACE(hypers(), info)


def test_unknown_types_at_evaluation_are_named() -> None:
    model = MetaMACE(hypers(), energy_info((1, 6))).to(torch.float64).eval()
    system = System(
        types=torch.tensor([1, 8, 14, 6]),
        positions=torch.rand(4, 3, dtype=torch.float64) * 3,
        cell=torch.zeros(3, 3, dtype=torch.float64),
        pbc=torch.tensor([False, False, False]),
    )
    system = get_system_with_neighbor_lists(system, model.requested_neighbor_lists())
    outputs = {"energy": ModelOutput(sample_kind="system")}
    with pytest.raises(ValueError, match=r"not trained on atomic types \[8, 14\]"):
        model([system], outputs)

    scripted = torch.jit.script(model)
    with pytest.raises(torch.jit.Error, match=r"not trained on atomic types \[8, 14\]"):
        scripted([system], outputs)


def test_empty_dataset(tmp_path) -> None:
    model = MetaMACE(hypers(), energy_info())
    training = copy.deepcopy(get_default_hypers(NAME)["training"])
    training["num_epochs"] = 1
    with pytest.raises(ValueError, match="the training set is empty"):
        Trainer(training).train(
            model,
            dtype=torch.float64,
            devices=[torch.device("cpu")],
            train_datasets=[[]],
            val_datasets=[[]],
            checkpoint_dir=str(tmp_path),
        )


def spherical_info(irreps, name: str = "mtt::tensor", sample_kind: str = "atom"):
    """DatasetInfo with one spherical target made of ``irreps``."""
    return DatasetInfo(
        length_unit="angstrom",
        atomic_types=[1, 6],
        targets={
            name: get_generic_target_info(
                name,
                {
                    "quantity": "",
                    "unit": "",
                    "type": {"spherical": {"irreps": irreps}},
                    "num_subtargets": 1,
                    "sample_kind": sample_kind,
                },
            )
        },
    )


def vector_info(name: str = "mtt::dipole") -> DatasetInfo:
    return DatasetInfo(
        length_unit="angstrom",
        atomic_types=[1, 6],
        targets={
            name: get_generic_target_info(
                name,
                {
                    "quantity": "",
                    "unit": "",
                    "type": {"cartesian": {"rank": 1}},
                    "num_subtargets": 1,
                    "sample_kind": "system",
                },
            )
        },
    )


def test_irrep_beyond_products_is_named() -> None:
    """Features 0e + 1o: products reach l <= 2, so an l = 3 target is refused."""
    info = spherical_info([{"o3_lambda": 3, "o3_sigma": 1}])
    message = (
        r"target 'mtt::tensor' \(block o3_lambda=3, o3_sigma=1\) needs the irrep 3o, "
        r"which neither the MACE node features \(they hold .*\) nor products of up "
        r"to three of them .* reach\. Add '3o' to 'hidden_irreps'.*'max_ell'"
    )
    with pytest.raises(ValueError, match=message):
        MetaMACE(hypers(max_ell=1), info)


def test_pseudoscalar_of_vector_features_is_a_triple_product() -> None:
    """Features 0e + 1o carry no 0o, but (1o x 1o) x 1o does: accepted."""
    info = spherical_info([{"o3_lambda": 0, "o3_sigma": -1}], name="mtt::chirality")
    model = MetaMACE(hypers(), info)
    block = model.heads["mtt::chirality"].blocks[0]
    assert type(block).__name__ == "ProductBlock"
    assert block.second is not None  # three factors


def test_pseudoscalar_of_scalar_features_is_refused() -> None:
    info = spherical_info([{"o3_lambda": 0, "o3_sigma": -1}], name="mtt::chirality")
    with pytest.raises(ValueError, match=r"'mtt::chirality'.*irrep 0o.*Add '0o'"):
        MetaMACE(hypers(hidden_irreps="4x0e"), info)


def test_declared_but_unreachable_irrep_is_refused() -> None:
    """3e is declared, but max_ell 1 and correlation 2 never produce it, and
    products of the 0e + 1o features that are produced stop at l = 2: a head could
    only predict zeros."""
    info = spherical_info([{"o3_lambda": 3, "o3_sigma": -1}], name="mtt::octupole")
    model_hypers = hypers(hidden_irreps="4x0e + 4x1o + 4x3e", max_ell=1, correlation=2)
    message = (
        r"target 'mtt::octupole' \(block o3_lambda=3, o3_sigma=-1\) needs the irrep "
        r"3e.*'hidden_irreps' declares '3e', but no path of the model reaches it.*"
        r"raise 'max_ell' \(to at least 3\), 'correlation' or 'num_interactions'"
    )
    with pytest.raises(ValueError, match=message):
        MetaMACE(model_hypers, info)


def test_declared_irrep_becomes_reachable_with_a_second_equivariant_layer() -> None:
    """The same 1e target trains once a second layer carries equivariant features."""
    info = spherical_info([{"o3_lambda": 1, "o3_sigma": -1}], name="mtt::spin")
    model_hypers = hypers(
        hidden_irreps="4x0e + 4x0o + 4x1o + 4x1e", max_ell=1, num_interactions=3
    )
    model = MetaMACE(model_hypers, info)
    assert "1e" in str(model.trunk.layout.produced_irreps)


def test_vector_with_one_interaction_is_refused() -> None:
    """With one interaction MACE keeps only scalars: no vector can be predicted."""
    message = (
        r"target 'mtt::dipole' \(a Cartesian vector\) needs the irrep 1o.*"
        r"'num_interactions: 1'.*set 'num_interactions' to 2 or more"
    )
    with pytest.raises(ValueError, match=message):
        MetaMACE(hypers(num_interactions=1), vector_info())
