"""Targets whose irreps the node features do not carry, rank-2 and atomic-basis
targets, with ordinary hypers (``8x0e + 8x1o + 8x2e``, ``max_ell: 2``,
``correlation: 2``, two interactions).

The node features then carry ``0e + 1o + 2e`` only; pseudotensors (``0o``, ``1e``,
``2o``, ``3e``) and ``l = 3`` targets are reached by tensor products of them
(:mod:`metatrain_mace.heads.products`), rank-2 targets are coupled from their
irreducible parts (:mod:`metatrain_mace.heads.coupling`). Checked on the exported
(TorchScript) model:
rotations and the inversion transform every block as its irreps say, and the heads
learn targets that really are pseudotensors and rank-2 tensors.
"""

from typing import Dict, List

import ase
import numpy as np
import pytest
import torch
from metatensor.torch import Labels, TensorBlock, TensorMap
from metatomic.torch import ModelOutput, systems_to_torch
from metatomic_ase import MetatomicCalculator
from metatrain.utils.architectures import get_default_hypers
from metatrain.utils.data import DatasetInfo
from metatrain.utils.neighbor_lists import get_system_with_neighbor_lists

from helpers.options import default_model
from helpers.symmetry import (
    _generic,
    as_3d,
    evaluate,
    expected_transform,
    o3_matrices,
    structures,
    transformed,
)
from metatrain_mace import MetaMACE
from metatrain_mace.heads.products import product_order
from metatrain_mace.mace_import import o3


ORDINARY = {
    "r_max": 3.5,
    "num_radial_basis": 4,
    "max_ell": 2,
    "num_interactions": 2,
    "hidden_irreps": "8x0e + 8x1o + 8x2e",
    "correlation": 2,
    "MLP_irreps": "8x0e",
    "radial_MLP": [8],
    "head_hidden_sizes": [8],
}
# every irrep the issue names that ordinary hypers do not carry
PSEUDO_IRREPS = [
    {"o3_lambda": 0, "o3_sigma": -1},
    {"o3_lambda": 1, "o3_sigma": -1},
    {"o3_lambda": 2, "o3_sigma": -1},
    {"o3_lambda": 3, "o3_sigma": -1},
    {"o3_lambda": 3, "o3_sigma": 1},
]
# an atomic basis: per atomic type, its own irreps and number of properties (a
# pseudovector on oxygen, reached by a product of the node features)
DENSITY_BASIS = {
    1: [
        {"num": 2, "o3_lambda": 0, "o3_sigma": 1},
        {"num": 1, "o3_lambda": 1, "o3_sigma": 1},
    ],
    6: [
        {"num": 3, "o3_lambda": 0, "o3_sigma": 1},
        {"num": 2, "o3_lambda": 1, "o3_sigma": 1},
        {"num": 1, "o3_lambda": 2, "o3_sigma": 1},
    ],
    8: [
        {"num": 1, "o3_lambda": 0, "o3_sigma": 1},
        {"num": 1, "o3_lambda": 1, "o3_sigma": -1},
    ],
}
STEPS = 150
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-4}


def tensor_targets() -> DatasetInfo:
    targets = {
        "mtt::pseudo_atom": _generic(
            "mtt::pseudo_atom", {"spherical": {"irreps": PSEUDO_IRREPS}}, 2, "atom"
        ),
        "mtt::pseudo_system": _generic(
            "mtt::pseudo_system", {"spherical": {"irreps": PSEUDO_IRREPS}}, 2, "system"
        ),
        "mtt::polarizability": _generic(
            "mtt::polarizability", {"cartesian": {"rank": 2}}, 1, "system"
        ),
        "mtt::atom_tensor": _generic(
            "mtt::atom_tensor", {"cartesian": {"rank": 2}}, 2, "atom"
        ),
        "mtt::coupled": _generic(
            "mtt::coupled",
            {
                "spherical": {
                    "product": "cartesian",
                    "irreps": [
                        {"o3_lambda": 1, "o3_sigma": 1},
                        {"o3_lambda": 2, "o3_sigma": -1},
                    ],
                }
            },
            2,
            "atom",
        ),
        "mtt::density": _generic(
            "mtt::density", {"spherical": {"irreps": DENSITY_BASIS}}, 1, "atom"
        ),
    }
    return DatasetInfo(length_unit="angstrom", atomic_types=[1, 6, 8], targets=targets)


def test_product_orders_of_ordinary_features() -> None:
    """Which irreps need 1, 2 or 3 factors of ``0e + 1o + 2e``, and which none."""
    carried = o3.Irreps("8x0e + 8x1o + 8x2e")
    expected = {
        "0e": 1, "1o": 1, "2e": 1,
        "1e": 2, "2o": 2, "3o": 2, "3e": 2, "4e": 2,
        "0o": 3, "4o": 3,
        "5e": None, "5o": None,
    }  # fmt: skip
    for irrep, order in expected.items():
        assert product_order(carried, o3.Irrep(irrep)) == order, irrep
    # scalars only: nothing but 0e, in any product
    assert product_order(o3.Irreps("4x0e"), o3.Irrep("1o")) is None


def test_unreachable_irrep_is_refused() -> None:
    hypers = default_model(**ORDINARY)
    info = DatasetInfo(
        length_unit="angstrom",
        atomic_types=[1, 6],
        targets={
            "mtt::l5": _generic(
                "mtt::l5",
                {"spherical": {"irreps": [{"o3_lambda": 5, "o3_sigma": 1}]}},
                1,
                "atom",
            )
        },
    )
    with pytest.raises(ValueError, match="needs the irrep 5o.*products of up to three"):
        MetaMACE(hypers, info)


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Dict[torch.dtype, str]:
    torch.manual_seed(0)
    hypers = default_model(**ORDINARY)
    model = MetaMACE(hypers, tensor_targets())
    # product blocks start at zero (see metatrain_mace.heads.products): random head
    # weights make every block non-trivial
    with torch.no_grad():
        for parameter in model.heads.parameters():
            parameter.normal_()
    directory = tmp_path_factory.mktemp("tensor-heads")
    paths = {}
    for dtype in (torch.float64, torch.float32):
        paths[dtype] = str(directory / f"model-{str(dtype)[6:]}.pt")
        model.to(dtype).export().save(paths[dtype])
    return paths


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_tensor_targets_transform_under_o3(exported, dtype) -> None:
    """Every block of every target, per atom and per structure, under two random
    rotations (one times the inversion) and the inversion."""
    torch.set_num_threads(1)
    calculator = MetatomicCalculator(exported[dtype], extensions_directory=None)
    info = tensor_targets()
    kinds = {
        name: ("cartesian" if t.is_cartesian else "spherical", t.sample_kind)
        for name, t in info.targets.items()
    }
    errors: Dict[str, float] = {}
    smallest = float("inf")
    for atoms in structures():
        reference = evaluate(calculator, atoms, kinds, "atom")
        for matrix in o3_matrices(5):
            new = evaluate(
                calculator, transformed(atoms, matrix.numpy()), kinds, "atom"
            )
            for name, blocks in reference.items():
                for (key, values), (_, new_values) in zip(
                    blocks, new[name], strict=True
                ):
                    expected = expected_transform(
                        as_3d(values), key, kinds[name][0], matrix
                    )
                    error = float((as_3d(new_values) - expected).abs().max())
                    label = f"{name} {key}"
                    errors[label] = max(errors.get(label, 0.0), error)
                    smallest = min(smallest, float(values.abs().max()))
    for label in sorted(errors):
        print(f"{dtype} {label}: max error {errors[label]:.2e}")
    # every block is non-trivial (the smallest block's largest value)
    assert smallest > 1e-4, smallest
    assert max(errors.values()) <= TOLERANCE[dtype], errors


def test_atomic_basis_blocks_hold_their_atoms(exported) -> None:
    """A block of an atomic-basis target holds the atoms of its type only, with the
    number of properties of that type, per atom and summed per structure."""
    calculator = MetatomicCalculator(exported[torch.float64], extensions_directory=None)
    atoms = structures()[0]
    numbers = atoms.numbers
    properties = {(1, 0): 2, (1, 1): 1, (6, 0): 3, (6, 1): 2, (6, 2): 1, (8, 0): 1}
    properties[8, 1] = 1
    kinds = {"mtt::density": ("spherical", "atom")}
    blocks = evaluate(calculator, atoms, kinds, "atom")["mtt::density"]
    assert len(blocks) == len(properties)
    for key, values in blocks:
        count = int((numbers == key["atom_type"]).sum())
        shape = (
            count,
            2 * key["o3_lambda"] + 1,
            properties[key["atom_type"], key["o3_lambda"]],
        )
        assert values.shape == shape
    summed = evaluate(
        calculator, atoms, {"mtt::density": ("spherical", "system")}, "system"
    )["mtt::density"]
    for (_, values), (_, total) in zip(blocks, summed, strict=True):
        assert torch.allclose(values.sum(0), total[0], atol=1e-12)


def _smooth(distance: np.ndarray) -> np.ndarray:
    return np.exp(-distance) * (distance < ORDINARY["r_max"])


def _pseudo_labels(atoms: ase.Atoms) -> Dict[str, torch.Tensor]:
    """Per atom, the pseudovector sum of w_ij w_ik (r_ij x r_ik); per structure,
    the pseudoscalar sum of w_ij w_ik w_il r_ij . (r_ik x r_il) and the symmetric
    tensor sum of w_ij r_ij r_ij^T."""
    positions = atoms.positions
    vectors = positions[None, :, :] - positions[:, None, :]
    weights = _smooth(np.linalg.norm(vectors, axis=-1))
    np.fill_diagonal(weights, 0.0)
    weighted = weights[..., None] * vectors
    # sum_jk w_ij w_ik (r_ij x r_ik) = (sum_j w_ij r_ij) x (sum_k ...) is zero: use
    # squared weights for the second factor, so that the two sums differ
    second = (weights**2)[..., None] * vectors
    cross = np.cross(weighted.sum(1), second.sum(1))
    third = (weights**3)[..., None] * vectors
    triple = np.einsum("ai,ai->a", cross, third.sum(1)).sum()
    tensor = np.einsum("aj,aji,ajk->ik", weights, vectors, vectors)
    return {
        # metatensor's l = 1 order is (y, z, x)
        "vector": torch.tensor(cross[:, [1, 2, 0]]),
        "scalar": torch.tensor([triple]),
        "tensor": torch.tensor(tensor),
    }


@pytest.mark.slow
def test_heads_learn_pseudotensors_and_rank2_tensors() -> None:
    """Per-atom 1e (cross products), per-structure 0o (triple products) and a
    symmetric rank-2 tensor: after STEPS steps of Adam each loss (in units of the
    target's mean square, so that zeros score 1) is below 0.7 and below the
    untrained model's. Measured: 1e 1.0 -> 0.51, 0o 1.0 -> 0.15, rank 2 1.76 -> 0.24."""
    torch.manual_seed(1)
    info = DatasetInfo(
        length_unit="angstrom",
        atomic_types=[1, 6, 8],
        targets={
            "mtt::vector": _generic(
                "mtt::vector",
                {"spherical": {"irreps": [{"o3_lambda": 1, "o3_sigma": -1}]}},
                1,
                "atom",
            ),
            "mtt::scalar": _generic(
                "mtt::scalar",
                {"spherical": {"irreps": [{"o3_lambda": 0, "o3_sigma": -1}]}},
                1,
                "system",
            ),
            "mtt::tensor": _generic(
                "mtt::tensor", {"cartesian": {"rank": 2}}, 1, "system"
            ),
        },
    )
    hypers = default_model(**ORDINARY)
    model = MetaMACE(hypers, info).train()
    rng = np.random.default_rng(3)
    frames = [
        ase.Atoms(
            numbers=rng.choice([1, 6, 8], size=6),
            positions=rng.uniform(0.0, 2.4, size=(6, 3)),
        )
        for _ in range(12)
    ]
    labels = [_pseudo_labels(atoms) for atoms in frames]
    systems = [
        get_system_with_neighbor_lists(
            systems_to_torch(atoms, dtype=torch.float64),
            model.requested_neighbor_lists(),
        )
        for atoms in frames
    ]
    references = {
        "mtt::vector": torch.cat([label["vector"] for label in labels]).unsqueeze(-1),
        "mtt::scalar": torch.stack([label["scalar"] for label in labels]),
        "mtt::tensor": torch.stack([label["tensor"] for label in labels]),
    }
    references["mtt::scalar"] = references["mtt::scalar"].reshape(-1, 1, 1)
    references["mtt::tensor"] = references["mtt::tensor"].unsqueeze(-1)
    # each target in units of its own size: predicting zeros gives a loss of 1
    spreads = {
        name: float(value.square().mean().sqrt()) for name, value in references.items()
    }
    outputs = {
        name: ModelOutput(sample_kind=info.targets[name].sample_kind)
        for name in references
    }

    def losses() -> Dict[str, torch.Tensor]:
        predicted = model(systems, outputs)
        return {
            name: torch.mean(
                ((predicted[name].block().values - reference) / spreads[name]) ** 2
            )
            for name, reference in references.items()
        }

    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    with torch.no_grad():
        before = {name: float(value) for name, value in losses().items()}
    for _ in range(STEPS):
        optimizer.zero_grad()
        loss = sum(losses().values())
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        after = {name: float(value) for name, value in losses().items()}
    print("loss before", before, "after", after)
    for name in references:
        # well below the loss of zeros (1), and of the untrained model
        assert after[name] < 0.7, (name, after[name])
        assert after[name] < before[name], (name, before[name], after[name])


def _density_target(atoms: ase.Atoms, layout: TensorMap) -> TensorMap:
    """A learnable atomic-basis target: per atom of each type, smooth radial sums
    (``0e``), sums of bond vectors (``1o``), their traceless outer products
    (``2e``) and, on oxygen, the cross product of two vector sums (``1e``)."""
    positions = atoms.positions
    vectors = positions[None, :, :] - positions[:, None, :]
    weights = _smooth(np.linalg.norm(vectors, axis=-1))
    np.fill_diagonal(weights, 0.0)
    blocks = []
    for key, block in layout.items():
        atoms_of_type = np.nonzero(atoms.numbers == int(key["atom_type"]))[0]
        n = len(block.properties)
        o3_lambda, o3_sigma = int(key["o3_lambda"]), int(key["o3_sigma"])
        rows = []
        for i in atoms_of_type:
            w = np.stack([weights[i] ** (k + 1) for k in range(n)])  # (n, atoms)
            if o3_lambda == 0:
                value = w.sum(1)[None, :]
            elif o3_lambda == 1 and o3_sigma == 1:
                value = (w @ vectors[i])[:, [1, 2, 0]].T
            elif o3_lambda == 1:
                first = weights[i] @ vectors[i]
                second = weights[i] ** 2 @ vectors[i]
                value = np.cross(first, second)[[1, 2, 0]][:, None]
            else:
                # the m = -2..2 components of a symmetric traceless tensor
                t = np.einsum("j,ja,jb->ab", weights[i], vectors[i], vectors[i])
                x, y, z = 0, 1, 2
                value = (
                    np.array(
                        [
                            2 * t[x, y],
                            2 * t[y, z],
                            (2 * t[z, z] - t[x, x] - t[y, y]) / np.sqrt(3),
                            2 * t[x, z],
                            t[x, x] - t[y, y],
                        ]
                    )[:, None]
                    * np.sqrt(3)
                    / 2
                )
            rows.append(value)
        values = torch.tensor(np.array(rows)).reshape(len(atoms_of_type), -1, n)
        samples = torch.tensor([[0, int(i)] for i in atoms_of_type], dtype=torch.int32)
        blocks.append(
            TensorBlock(
                values=values,
                samples=Labels(["system", "atom"], samples.reshape(-1, 2)),
                components=block.components,
                properties=block.properties,
            )
        )
    return TensorMap(layout.keys, blocks)


@pytest.mark.slow
def test_atomic_basis_target_trains(tmp_path) -> None:
    """metatrain's disk dataset with an atomic-basis target, trained by our trainer
    (densified in the data loader, sparse out of the exported model): the RMSE of
    every block, measured with the exported model, falls during training."""
    from metatomic.torch import System
    from metatrain.utils.data import DiskDataset
    from metatrain.utils.data.writers import DiskDatasetWriter

    from metatrain_mace import Trainer

    info = DatasetInfo(
        length_unit="angstrom",
        atomic_types=[1, 6, 8],
        targets={
            "mtt::density": _generic(
                "mtt::density", {"spherical": {"irreps": DENSITY_BASIS}}, 1, "atom"
            )
        },
    )
    layout = info.targets["mtt::density"].layout
    rng = np.random.default_rng(5)
    frames = [
        ase.Atoms(
            numbers=np.array([1, 6, 8, 1, 6, 1]),
            positions=rng.uniform(0.0, 2.6, size=(6, 3)),
        )
        for _ in range(16)
    ]
    references = [_density_target(atoms, layout) for atoms in frames]
    writer = DiskDatasetWriter(str(tmp_path / "density.zip"))
    for atoms, target in zip(frames, references, strict=True):
        system = systems_to_torch(atoms, dtype=torch.float64)
        system = System(
            types=system.types,
            positions=system.positions,
            cell=system.cell,
            pbc=system.pbc,
        )
        writer.write([system], {"mtt::density": target})
    writer.finish()
    dataset = DiskDataset(str(tmp_path / "density.zip"))

    def rmse(model: MetaMACE) -> Dict[str, float]:
        calculator = MetatomicCalculator(model.export(), extensions_directory=None)
        kinds = {"mtt::density": ("spherical", "atom")}
        errors: Dict[str, List[float]] = {}
        for atoms, reference in zip(frames, references, strict=True):
            predicted = evaluate(calculator, atoms, kinds, "atom")["mtt::density"]
            assert len(predicted) == len(reference.keys)
            for key, values in predicted:
                block = reference.block(key)
                label = f"{key['atom_type']}/{key['o3_lambda']}{key['o3_sigma']:+d}"
                diff = (values - block.values).square().mean()
                errors.setdefault(label, []).append(float(diff))
        return {k: float(np.sqrt(np.mean(v))) for k, v in errors.items()}

    torch.manual_seed(0)
    hypers = default_model(**ORDINARY)
    model = MetaMACE(hypers, info)
    training = get_default_hypers("experimental.mace")["training"]
    mse = {"type": "mse", "weight": 1.0, "reduction": "mean", "gradients": {}}
    training.update(
        {
            "num_epochs": 0,
            "batch_size": 4,
            "num_workers": 0,
            "learning_rate": 1e-2,
            "loss": {"mtt::density": mse},
        }
    )
    # zero epochs: the scaler and the baseline only (the untrained reference)
    Trainer(dict(training)).train(
        model,
        dtype=torch.float64,
        devices=[torch.device("cpu")],
        train_datasets=[dataset],
        val_datasets=[dataset],
        checkpoint_dir=str(tmp_path),
    )
    before = rmse(model)
    training["num_epochs"] = 15
    Trainer(dict(training)).train(
        model,
        dtype=torch.float64,
        devices=[torch.device("cpu")],
        train_datasets=[dataset],
        val_datasets=[dataset],
        checkpoint_dir=str(tmp_path),
    )
    after = rmse(model)
    print("RMSE before", before, "after", after)
    assert set(before) == {
        "1/0+1",
        "1/1+1",
        "6/0+1",
        "6/1+1",
        "6/2+1",
        "8/0+1",
        "8/1-1",
    }
    for block in before:
        assert after[block] < 0.7 * before[block], (block, before[block], after[block])
