"""The prepared-once data pipeline gives exactly the batches of metatrain's own."""

import metatensor.torch as mts
import pytest
import torch
from metatrain.composition import train_or_load_composition_model
from metatrain.scaler import train_or_load_scaler
from metatrain.utils.additive import get_remove_additive_transform
from metatrain.utils.architectures import get_default_hypers
from metatrain.utils.data import CollateFn, DatasetInfo, get_dataset, unpack_batch
from metatrain.utils.neighbor_lists import (
    get_requested_neighbor_lists,
    get_system_with_neighbor_lists_transform,
)
from metatrain.utils.omegaconf import expand_dataset_config
from metatrain.utils.scaler import get_remove_scale_transform
from omegaconf import OmegaConf

from helpers.datasets import ALLOY_TARGETS
from metatrain_mace import MetaMACE
from metatrain_mace.train.loading import (
    JoinBatch,
    PreparedDataset,
    is_in_memory,
    prepare_data,
    unpack,
)


NAME = "experimental.mace"
BATCHES = [[0, 1, 2], [5, 3], [7, 11, 4, 9]]


@pytest.fixture
def setup(alloy_path, tmp_path):
    options = expand_dataset_config(
        OmegaConf.create(
            {
                "systems": {"read_from": alloy_path, "length_unit": "angstrom"},
                "targets": ALLOY_TARGETS,
            }
        )
    )
    dataset, target_info, _ = get_dataset(options[0])
    hypers = get_default_hypers(NAME)
    model_hypers = hypers["model"]
    model_hypers.update(hidden_irreps="4x0e + 4x1o", radial_MLP=[8])
    model = MetaMACE(
        model_hypers,
        DatasetInfo(length_unit="angstrom", atomic_types=[29, 79], targets=target_info),
    )
    train_or_load_composition_model(
        composition_model=model.additive_models[0],
        atomic_baseline=hypers["training"]["atomic_baseline"],
        train_datasets=[dataset],
        other_additive_models=[],
        batch_size=4,
        is_distributed=False,
        checkpoint_dir=str(tmp_path),
    )
    train_or_load_scaler(
        scaler=model.scaler,
        fixed_weights=hypers["training"]["fixed_scaling_weights"],
        train_datasets=[dataset],
        additive_models=list(model.additive_models),
        batch_size=4,
        is_distributed=False,
        checkpoint_dir=str(tmp_path),
        per_structure_targets=[],
    )
    transforms = [
        get_system_with_neighbor_lists_transform(get_requested_neighbor_lists(model)),
        get_remove_additive_transform(list(model.additive_models), target_info),
        get_remove_scale_transform(model.scaler),
    ]
    return dataset, transforms, list(target_info)


def assert_same_batch(reference, batch) -> None:
    ref_systems, ref_targets, ref_extra = reference
    systems, targets, extra = batch
    assert len(systems) == len(ref_systems)
    for ref_system, system in zip(ref_systems, systems, strict=True):
        assert torch.equal(system.positions, ref_system.positions)
        assert torch.equal(system.types, ref_system.types)
        assert torch.equal(system.cell, ref_system.cell)
        options = ref_system.known_neighbor_lists()
        assert options == system.known_neighbor_lists() and len(options) == 1
        ref_neighbors = ref_system.get_neighbor_list(options[0])
        neighbors = system.get_neighbor_list(options[0])
        assert torch.equal(neighbors.samples.values, ref_neighbors.samples.values)
        assert torch.equal(neighbors.values, ref_neighbors.values)
    assert sorted(targets) == sorted(ref_targets)
    for name in ref_targets:
        assert mts.equal(targets[name], ref_targets[name])
    assert sorted(extra) == sorted(ref_extra)


def test_prepared_batches_equal_metatrain_batches(setup) -> None:
    dataset, transforms, target_keys = setup
    reference_collate = CollateFn(target_keys=target_keys, callables=transforms)
    prepared = PreparedDataset(dataset, transforms, target_keys, "test")
    assert len(prepared) == len(dataset)
    serialising_collate = CollateFn(target_keys=target_keys, callables=[])
    join = JoinBatch(target_keys)
    for indices in BATCHES:
        reference = unpack_batch(reference_collate([dataset[i] for i in indices]))
        samples = [prepared[i] for i in indices]
        assert_same_batch(reference, unpack(join(samples)))
        assert_same_batch(reference, unpack(serialising_collate(samples)))
        # the baseline and the scale were removed (the batches are not the raw data)
        raw = dataset[indices[0]].energy.block().values
        assert abs(float(reference[1]["energy"].block().values[0, 0] - raw[0, 0])) > 0.1
    assert prepared.get_num_atoms(3) == len(dataset[3].system)


def test_prepare_data_dispatch(setup) -> None:
    dataset, transforms, target_keys = setup
    subset = torch.utils.data.Subset(dataset, [0, 2, 4])
    assert is_in_memory(dataset) and is_in_memory(subset)

    train, val, collate = prepare_data(
        [dataset], [subset], transforms, target_keys, num_workers=0
    )
    assert isinstance(train[0], PreparedDataset) and isinstance(collate, JoinBatch)
    assert len(val[0]) == 3
    _, _, collate = prepare_data(
        [dataset], [subset], transforms, target_keys, num_workers=2
    )
    assert isinstance(collate, CollateFn) and collate.callables == []

    class LazyDataset(torch.utils.data.Dataset):
        """Stands for a dataset read from disk (DiskDataset, MemmapDataset)."""

        def __len__(self) -> int:
            return len(dataset)

        def __getitem__(self, index):
            return dataset[index]

    lazy = LazyDataset()
    assert not is_in_memory(lazy)
    train, val, collate = prepare_data(
        [lazy], [subset], transforms, target_keys, num_workers=0
    )
    assert train[0] is lazy and val[0] is subset
    assert isinstance(collate, CollateFn) and collate.callables == transforms


def test_join_samples_with_different_blocks() -> None:
    """Samples of one target with different blocks are joined as a union."""
    from metatensor.learn.data import Dataset
    from metatensor.torch import Labels, TensorBlock, TensorMap
    from metatomic.torch import System

    def sample_map(index: int, key: int) -> TensorMap:
        block = TensorBlock(
            values=torch.full((1, 1), float(index), dtype=torch.float64),
            samples=Labels(["system"], torch.tensor([[index]])),
            components=[],
            properties=Labels(["p"], torch.tensor([[0]])),
        )
        return TensorMap(Labels(["k"], torch.tensor([[key]])), [block])

    system = System(
        types=torch.tensor([1]),
        positions=torch.zeros((1, 3), dtype=torch.float64),
        cell=torch.zeros((3, 3), dtype=torch.float64),
        pbc=torch.tensor([False, False, False]),
    )
    dataset = Dataset.from_dict(
        {
            "system": [system] * 3,
            "t": [sample_map(0, 0), sample_map(1, 1), sample_map(2, 0)],
        }
    )
    systems, targets, extra = JoinBatch(["t"])([dataset[i] for i in range(3)])
    assert len(systems) == 3 and extra == {}
    joined = targets["t"]
    assert joined.keys.values.flatten().tolist() == [0, 1]
    assert joined.block({"k": 0}).values.flatten().tolist() == [0.0, 2.0]
    assert joined.block({"k": 1}).values.flatten().tolist() == [1.0]
    # same keys everywhere: the fast join gives metatrain's union join
    same = [dataset[0], dataset[2]]
    reference = CollateFn(target_keys=["t"], callables=[])(same)
    assert mts.equal(JoinBatch(["t"])(same)[1]["t"], unpack(reference)[1]["t"])
