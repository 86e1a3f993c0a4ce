"""Metrics accumulated in scaled units and rescaled once equal metatrain's metrics
computed on predictions and targets rescaled batch by batch."""

import metatensor.torch as mts
import pytest
import torch
from metatrain.composition import train_or_load_composition_model
from metatrain.scaler import train_or_load_scaler
from metatrain.utils.additive import get_remove_additive_transform
from metatrain.utils.architectures import get_default_hypers
from metatrain.utils.data import DatasetInfo, get_dataset
from metatrain.utils.metrics import MAEAccumulator, RMSEAccumulator
from metatrain.utils.neighbor_lists import (
    get_requested_neighbor_lists,
    get_system_with_neighbor_lists_transform,
)
from metatrain.utils.omegaconf import expand_dataset_config
from metatrain.utils.scaler import get_remove_scale_transform
from omegaconf import OmegaConf

from helpers.multitarget import write_dataset
from metatrain_mace import MetaMACE
from metatrain_mace.train.loading import JoinBatch, PreparedDataset, unpack
from metatrain_mace.train.metrics import TargetUnitMetrics, uniform_scale


KEPT = ["energy", "mtt::scalars", "mtt::atom_scalars", "mtt::dipole"]


@pytest.fixture(scope="module")
def batches(tmp_path_factory):
    directory = tmp_path_factory.mktemp("metrics")
    written = write_dataset(directory, n_structures=12)
    targets = {name: written["targets"][name] for name in KEPT}
    options = expand_dataset_config(
        OmegaConf.create(
            {
                "systems": {"read_from": written["xyz"], "length_unit": "angstrom"},
                "targets": targets,
            }
        )
    )
    dataset, target_info, _ = get_dataset(options[0])
    hypers = get_default_hypers("experimental.mace")
    model_hypers = hypers["model"]
    model_hypers.update(hidden_irreps="4x0e + 4x1o", radial_MLP=[8], r_max=3.5)
    model = MetaMACE(
        model_hypers,
        DatasetInfo(
            length_unit="angstrom", atomic_types=[1, 6, 8], targets=target_info
        ),
    )
    for fit, kwargs in (
        (
            train_or_load_composition_model,
            dict(
                composition_model=model.additive_models[0],
                atomic_baseline=hypers["training"]["atomic_baseline"],
                other_additive_models=[],
            ),
        ),
        (
            train_or_load_scaler,
            dict(
                scaler=model.scaler,
                fixed_weights=hypers["training"]["fixed_scaling_weights"],
                additive_models=list(model.additive_models),
                per_structure_targets=[],
            ),
        ),
    ):
        fit(
            train_datasets=[dataset],
            batch_size=4,
            is_distributed=False,
            checkpoint_dir=str(directory),
            **kwargs,
        )
    transforms = [
        get_system_with_neighbor_lists_transform(get_requested_neighbor_lists(model)),
        get_remove_additive_transform(list(model.additive_models), target_info),
        get_remove_scale_transform(model.scaler),
    ]
    prepared = PreparedDataset(dataset, transforms, list(target_info), "train")
    join = JoinBatch(list(target_info))
    torch.manual_seed(0)
    result = []
    for indices in ([0, 1, 2, 3], [4, 5], [6, 7, 8, 9, 10, 11]):
        systems, targets, extra = unpack(join([prepared[i] for i in indices]))
        # predictions: the targets plus noise of the same structure (with gradients)
        predictions = {
            name: mts.add(tensor, mts.random_uniform_like(tensor))
            for name, tensor in targets.items()
        }
        result.append((systems, predictions, targets, extra))
    return model, result


def test_scales_are_nontrivial_and_classified(batches) -> None:
    model, _ = batches
    scales = {name: uniform_scale(model.scaler, name) for name in KEPT}
    assert scales["mtt::atom_scalars"] is None  # per-atom: per-type scales
    for name in ("energy", "mtt::scalars", "mtt::dipole"):
        assert scales[name] is not None and abs(scales[name] - 1.0) > 1e-3, name


@pytest.mark.parametrize("separate_blocks", [False, True])
def test_metrics_equal_metatrain_on_rescaled_batches(batches, separate_blocks) -> None:
    model, data = batches
    metrics = TargetUnitMetrics(
        model.scaler, KEPT, separate_blocks=separate_blocks, with_mae=True
    )
    rmse = RMSEAccumulator(separate_blocks)
    mae = MAEAccumulator(separate_blocks)
    for systems, predictions, targets, extra in data:
        metrics.update(systems, predictions, targets, extra)
        rescaled = [
            model.scaler.apply_scales(
                systems,
                tensors,
                remove=False,
                use_per_target_scales=True,
                use_per_property_scales=False,
            )
            for tensors in (predictions, targets)
        ]
        rmse.update(*rescaled, extra)
        mae.update(*rescaled, extra)
    device = torch.device("cpu")
    expected = rmse.finalize(not_per_atom=["positions_gradients"], device=device)
    expected.update(mae.finalize(not_per_atom=["positions_gradients"], device=device))
    result = metrics.finalize(["positions_gradients"], device)
    assert sorted(result) == sorted(expected)
    assert any("forces" in name or "gradients" in name for name in result)
    for name, value in expected.items():
        assert result[name] == pytest.approx(value, rel=1e-10, abs=0.0), name
