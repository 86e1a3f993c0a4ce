"""LoRA fine-tuning: equivariant low-rank adapters on MACE's linear layers."""

import copy
from pathlib import Path

import ase.io
import numpy as np
import pytest
import torch
from metatomic.torch import (
    ModelEvaluationOptions,
    ModelOutput,
    load_atomistic_model,
    systems_to_torch,
)
from metatrain.utils.architectures import get_default_hypers
from metatrain.utils.data import DatasetInfo, get_atomic_types, get_dataset
from metatrain.utils.data.target_info import (
    get_energy_target_info,
    get_generic_target_info,
)
from metatrain.utils.neighbor_lists import get_system_with_neighbor_lists
from metatrain.utils.omegaconf import expand_dataset_config
from omegaconf import OmegaConf
from scipy.spatial.transform import Rotation

from helpers.cli import mtt, train_log
from helpers.datasets import ALLOY_TARGETS
from helpers.mace_files import save_mace_model
from helpers.options import alloy_options, write_options
from metatrain_mace import MetaMACE, Trainer
from metatrain_mace.finetune import lora
from metatrain_mace.finetune.strategies import apply_finetuning
from metatrain_mace.mace_import import o3


NAME = "experimental.mace"
ENERGY = {"energy": ModelOutput(sample_kind="system")}
# energies per structure, charges per atom
OUTPUTS = {**ENERGY, "mtt::charge": ModelOutput(sample_kind="atom")}


def lora_strategy(**config) -> dict:
    return {
        "method": "lora",
        "read_from": "model.ckpt",
        "config": {"rank": 2, "alpha": 4.0, **config},
        "inherit_heads": {},
    }


@pytest.fixture
def model() -> MetaMACE:
    torch.manual_seed(0)
    hypers = get_default_hypers(NAME)["model"]
    hypers.update(
        r_max=4.5,
        hidden_irreps="8x0e + 8x1o",
        max_ell=2,
        correlation=2,
        radial_MLP=[16],
        head_hidden_sizes=[8],
    )
    targets = {
        "energy": get_energy_target_info("energy", {"unit": "eV"}),
        "mtt::charge": get_generic_target_info(
            "mtt::charge",
            {
                "quantity": "",
                "unit": "",
                "type": "scalar",
                "num_subtargets": 1,
                "sample_kind": "atom",
            },
        ),
    }
    info = DatasetInfo(length_unit="angstrom", atomic_types=[29, 79], targets=targets)
    model = MetaMACE(hypers, info).to(torch.float64)
    model.set_avg_num_neighbors(12.0)
    return model.eval()


@pytest.fixture
def frames(alloy_path: str) -> list:
    return ase.io.read(alloy_path, ":3")


def to_systems(model: MetaMACE, frames: list) -> list:
    return [
        get_system_with_neighbor_lists(
            systems_to_torch(atoms, dtype=torch.float64),
            model.requested_neighbor_lists(),
        )
        for atoms in frames
    ]


def flat(result: dict) -> torch.Tensor:
    """Energies of the structures, then charges of the atoms."""
    return torch.cat(
        [result[name].block().values.detach().reshape(-1) for name in OUTPUTS]
    )


def energies(model: torch.nn.Module, systems: list) -> torch.Tensor:
    return flat(model(systems, OUTPUTS))


def randomise_adapters(model: MetaMACE, scale: float = 0.5) -> None:
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if ".lora_" in name:
                parameter.copy_(
                    scale * torch.randn(parameter.shape, generator=generator)
                )


def test_adapters_start_as_identity(model, frames) -> None:
    systems = to_systems(model, frames)
    before = energies(model, systems)
    apply_finetuning(
        model,
        lora_strategy(
            target_modules=["mace.interactions.*.linear", "linear_up", "last"]
        ),
    )
    adapted = lora.adapters(model)
    # two interactions x (linear, linear_up), MLP head's last layer
    assert sorted(adapted) == [
        "heads.mtt::charge.last",
        "mace.interactions.0.linear",
        "mace.interactions.0.linear_up",
        "mace.interactions.1.linear",
        "mace.interactions.1.linear_up",
    ]
    assert isinstance(adapted["heads.mtt::charge.last"], lora.LinearLoRA)
    # the bottleneck holds rank copies of the irreps the layer connects
    layer = adapted["mace.interactions.1.linear"]
    assert str(layer.lora_down.irreps_out) == "2x0e+2x1o+2x2e"
    assert layer.irreps_out == o3.Irreps("8x0e+8x1o+8x2e")
    assert model.finetune_config[lora.RECORD_KEY]["mace.interactions.0.linear"] == {
        "rank": 2,
        "alpha": 4.0,
    }
    after = energies(model, systems)
    assert torch.equal(before, after)
    randomise_adapters(model)
    assert (energies(model, systems) - before).abs().min() > 1e-4


def test_only_adapters_and_heads_train(model, frames) -> None:
    systems = to_systems(model, frames)
    apply_finetuning(model, lora_strategy())
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == sorted(
        [
            f"trunk.mace.{block}.{i}.linear.lora_{side}.weight"
            for block in ("interactions", "products")
            for i in (0, 1)
            for side in ("down", "up")
        ]
        + [n for n, _ in model.named_parameters() if n.startswith("heads.")]
    )
    frozen = {
        n: p.detach().clone()
        for n, p in model.named_parameters()
        if not p.requires_grad
    }
    assert len(frozen) > 20

    before = energies(model, systems)
    model.train()
    optimizer = torch.optim.Adam(
        [p for p in model.parameters() if p.requires_grad], lr=1e-2
    )
    for _ in range(3):
        optimizer.zero_grad()
        energy = model(systems, ENERGY)["energy"].block().values
        loss = ((energy - 1.0) ** 2).sum()
        loss.backward()
        optimizer.step()
    model.eval()
    after = energies(model, systems)
    n = len(systems)
    assert (after[:n] - before[:n]).abs().min() > 1e-3
    for name, parameter in model.named_parameters():
        if name in frozen:
            assert torch.equal(parameter, frozen[name]), name
            assert parameter.grad is None, name
    up = model.trunk.mace.products[0].linear.lora_up.weight
    assert up.abs().max() > 1e-3


def rotated(atoms, matrix: np.ndarray):
    atoms = atoms.copy()
    atoms.positions = atoms.positions @ matrix.T
    atoms.cell = atoms.cell.array @ matrix.T
    return atoms


def test_adapted_model_is_invariant(model, frames) -> None:
    apply_finetuning(model, lora_strategy(target_modules=["linear*"]))
    # every o3.Linear of the trunk, readouts and node embedding included
    assert len(lora.adapters(model)) == 10
    unchanged = energies(model, to_systems(model, frames))
    randomise_adapters(model)
    matrix = Rotation.random(random_state=3).as_matrix()
    original = energies(model, to_systems(model, frames))
    turned = energies(model, to_systems(model, [rotated(a, matrix) for a in frames]))
    assert (original - turned).abs().max() < 1e-10
    # the adapters change the energies by far more than that
    assert (unchanged - original).abs().min() > 1e-3


def test_checkpoint_and_export(model, frames, tmp_path: Path) -> None:
    systems = to_systems(model, frames)
    apply_finetuning(model, lora_strategy())
    randomise_adapters(model, scale=0.3)
    reference = energies(model, systems)

    torch.save(model.get_checkpoint(), tmp_path / "lora.ckpt")
    checkpoint = torch.load(tmp_path / "lora.ckpt", weights_only=False)
    loaded = MetaMACE.load_checkpoint(checkpoint, "export").eval()
    assert sorted(lora.adapters(loaded)) == sorted(lora.adapters(model))
    assert (energies(loaded, systems) - reference).abs().max() < 1e-10

    # a second LoRA fine-tuning goes on with the same adapters, without nesting
    apply_finetuning(loaded, lora_strategy())
    assert loaded.state_dict().keys() == model.state_dict().keys()
    assert (energies(loaded, systems) - reference).abs().max() < 1e-10
    # other methods keep the adapters, and the record that restores them
    apply_finetuning(loaded, {"method": "full", "read_from": "lora.ckpt"})
    assert loaded.finetune_config[lora.RECORD_KEY].keys() == (
        model.finetune_config[lora.RECORD_KEY].keys()
    )
    reloaded = MetaMACE.load_checkpoint(loaded.get_checkpoint(), "restart").eval()
    assert (energies(reloaded, systems) - reference).abs().max() < 1e-10

    loaded.export().save(str(tmp_path / "lora.pt"))
    exported = load_atomistic_model(str(tmp_path / "lora.pt"))
    result = exported(
        systems,
        ModelEvaluationOptions(length_unit="angstrom", outputs=OUTPUTS),
        check_consistency=True,
    )
    assert (flat(result) - reference).abs().max() < 1e-10


def test_errors(model) -> None:
    with pytest.raises(ValueError, match=r"unknown fine-tuning method 'lorra'.*'lora'"):
        apply_finetuning(model, {"method": "lorra", "read_from": "x"})
    with pytest.raises(ValueError, match=r"invalid LoRA rank 0 .*integer >= 1"):
        apply_finetuning(model, lora_strategy(rank=0))
    with pytest.raises(ValueError, match=r"'finetune.config.rank' is required"):
        apply_finetuning(model, {"method": "lora", "read_from": "x", "config": {}})
    with pytest.raises(
        ValueError,
        match=r"pattern 'mace.interaction.\*.linear' matches no linear layer.*"
        r"'mace.interactions.0.linear'",
    ):
        apply_finetuning(
            model, lora_strategy(target_modules=["mace.interaction.*.linear"])
        )
    with pytest.raises(ValueError, match=r"unknown keys \['ranks'\]"):
        apply_finetuning(model, lora_strategy(ranks=3))
    # nothing was adapted by the failed attempts
    assert lora.adapters(model) == {}


def test_lora_on_a_mace_file(frames, tmp_path: Path) -> None:
    """A trunk read from a MACE file travels in the checkpoint with its adapters."""
    hypers = get_default_hypers(NAME)["model"]
    hypers["mace_model"] = str(
        save_mace_model(tmp_path / "file.model", pair_repulsion=True)
    )
    info = DatasetInfo(
        length_unit="angstrom",
        atomic_types=[29, 79],
        targets={"energy": get_energy_target_info("energy", {"unit": "eV"})},
    )
    model = MetaMACE(hypers, info).eval()
    systems = to_systems(model, frames)
    before = model(systems, ENERGY)["energy"].block().values.detach()
    apply_finetuning(
        model,
        lora_strategy(target_modules=["linear", "linear_*"], trainable_modules=[]),
    )
    # node embedding, 2 x (linear_up, linear), 2 products, 3 readout layers
    assert len(lora.adapters(model)) == 10
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [
        n for n, _ in model.named_parameters() if ".lora_" in n
    ]
    randomise_adapters(model, scale=0.3)
    after = model(systems, ENERGY)["energy"].block().values.detach()
    assert (after - before).abs().min() > 1e-4

    torch.save(model.get_checkpoint(), tmp_path / "file.ckpt")
    checkpoint = torch.load(tmp_path / "file.ckpt", weights_only=False)
    loaded = MetaMACE.load_checkpoint(checkpoint, "export").eval()
    assert sorted(lora.adapters(loaded)) == sorted(lora.adapters(model))
    reloaded = loaded(systems, ENERGY)["energy"].block().values.detach()
    assert (reloaded - after).abs().max() < 1e-10


def base_checkpoint(path: Path, directory: Path) -> None:
    """A 1-epoch training run of the tiny model, in process (faster than ``mtt``)."""
    torch.manual_seed(0)
    dataset, targets, _ = get_dataset(
        expand_dataset_config(
            OmegaConf.create(
                {
                    "systems": {"read_from": str(path), "length_unit": "angstrom"},
                    "targets": ALLOY_TARGETS,
                }
            )
        )[0]
    )
    info = DatasetInfo(
        length_unit="angstrom", atomic_types=get_atomic_types(dataset), targets=targets
    )
    model_hypers = get_default_hypers(NAME)["model"]
    model_hypers.update(alloy_options("x")["architecture"]["model"])
    training = get_default_hypers(NAME)["training"]
    mse = {"type": "mse", "weight": 1.0, "reduction": "mean"}
    training.update(
        num_epochs=1,
        batch_size=4,
        num_workers=0,
        loss={"energy": {**mse, "gradients": {"positions": mse, "strain": mse}}},
    )
    model = MetaMACE(model_hypers, info)
    trainer = Trainer(training)
    trainer.train(
        model,
        torch.float64,
        [torch.device("cpu")],
        [dataset],
        [dataset],
        str(directory),
    )
    trainer.save_checkpoint(model, directory / "base.ckpt")


@pytest.mark.slow
def test_mtt_train_lora_then_export(tmp_path: Path, alloy_path: str) -> None:
    workdir = tmp_path
    frames = ase.io.read(alloy_path, ":10")
    ase.io.write(workdir / "small.xyz", frames)
    base_checkpoint(workdir / "small.xyz", workdir)

    finetune = {
        "method": "lora",
        "read_from": "base.ckpt",
        "config": {"rank": 2, "alpha": 4.0},
    }
    write_options(
        workdir / "lora.yaml",
        alloy_options("small.xyz", num_epochs=1, learning_rate=0.01, finetune=finetune),
    )
    result = mtt("train", "lora.yaml", "-o", "lora.pt", cwd=workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    log = train_log(workdir)
    assert "LoRA adapters on 4 layers" in log
    # rank-2 adapters (down + up weights): interactions.0.linear 48 + 48,
    # interactions.1.linear (input 2x0e, 3x1o, 2x2e of 8 each) 112 + 48,
    # products.0.linear 32 + 32, products.1.linear 16 + 16; no other head
    assert "Fine-tuning method 'lora': 352/" in log

    base = torch.load(workdir / "base.ckpt", weights_only=False)
    tuned = torch.load(workdir / "lora.ckpt", weights_only=False)
    assert set(tuned["finetune_config"][lora.RECORD_KEY]) == {
        "mace.interactions.0.linear",
        "mace.interactions.1.linear",
        "mace.products.0.linear",
        "mace.products.1.linear",
    }
    # fine-tuning starts from the best (averaged) weights of the checkpoint
    base_state = base["best_model_state_dict"]
    tuned_state = tuned["model_state_dict"]
    # the trunk is frozen: only the adapters changed (their up maps left zero)
    renamed = {
        name.replace(".linear.base.", ".linear."): value
        for name, value in tuned_state.items()
        if ".lora_" not in name
    }
    for name, value in base_state.items():
        if name.startswith("trunk.mace."):
            assert torch.equal(renamed[name], value), name
    ups = [v for n, v in tuned_state.items() if n.endswith(".lora_up.weight")]
    assert len(ups) == 4 and min(float(v.abs().max()) for v in ups) > 1e-4

    result = mtt("export", "lora.ckpt", "-o", "exported.pt", cwd=workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    eager = MetaMACE.load_checkpoint(tuned, "export").eval()
    systems = to_systems(eager, frames[:2])
    expected = eager(systems, ENERGY)["energy"].block().values.detach()
    exported = load_atomistic_model(str(workdir / "exported.pt"))
    result = exported(
        systems,
        ModelEvaluationOptions(length_unit="angstrom", outputs=ENERGY),
        check_consistency=True,
    )
    assert (result["energy"].block().values - expected).abs().max() < 1e-10
    # the fine-tuned model differs from the base model
    original = MetaMACE.load_checkpoint(base, "export").eval()
    before = original(systems, ENERGY)["energy"].block().values.detach()
    assert (before - expected).abs().min() > 1e-6


def test_checkpoint_of_version_4_with_adapters_in_the_trunk(tmp_path: Path) -> None:
    """A LoRA fine-tuned MACE file checkpointed by metatrain-mace before the
    subpackages (model checkpoint version 4) pickles its adapters under
    ``metatrain_mace.lora``: it loads, and gives the energy the old version gave
    (-1.831830986678354 eV, computed by that version)."""
    import gzip

    import ase.build
    from metatrain.utils.io import load_model

    path = tmp_path / "old.ckpt"
    archive = Path(__file__).parent / "lora-file-model-v4.ckpt.gz"
    path.write_bytes(gzip.decompress(archive.read_bytes()))
    model = load_model(str(path)).eval()
    assert model.finetune_config["method"] == "lora"
    assert len(lora.adapters(model)) > 0
    atoms = ase.build.bulk("Cu", "fcc", a=3.6, cubic=True)
    atoms.symbols[1] = "Au"
    atoms.rattle(0.05, seed=1)
    system = get_system_with_neighbor_lists(
        systems_to_torch(atoms, dtype=torch.float64), model.requested_neighbor_lists()
    )
    energy = model([system], {"energy": ModelOutput(sample_kind="system")})["energy"]
    assert energy.block().values.item() == pytest.approx(-1.831830986678354, abs=1e-12)


@pytest.mark.parametrize(
    "irreps_in, irreps_out",
    [
        ("8x0e + 8x1o + 8x2e", "8x0e + 8x1o + 8x2e"),
        # unsimplified irreps and irreps that only one side has
        ("3x0e + 2x1o + 4x0e", "5x1o + 2x0e + 1x2e"),
    ],
)
def test_merged_adapters_compute_what_the_adapted_layers_compute(
    irreps_in, irreps_out
) -> None:
    """Folded into one layer (for MACE files), an adapter's update gives the
    adapted layer's outputs to rounding, for o3.Linear and torch.nn.Linear."""
    torch.manual_seed(0)
    layers = [
        o3.Linear(o3.Irreps(irreps_in), o3.Irreps(irreps_out)).to(torch.float64),
        torch.nn.Linear(7, 5, dtype=torch.float64),
    ]
    for layer in layers:
        adapter = lora.make_adapter(layer, rank=2, alpha=3.0)
        with torch.no_grad():
            adapter.lora_up.weight.normal_()
            adapter.lora_down.weight.normal_()
        size = layer.irreps_in.dim if isinstance(layer, o3.Linear) else 7
        x = torch.randn(11, size, dtype=torch.float64)
        expected = adapter(x).detach()
        merged = lora.merged_weights(adapter)
        plain = copy.deepcopy(layer)
        plain.load_state_dict(merged)
        got = plain(x).detach()
        assert (expected - adapter.base(x)).abs().max() > 1e-2  # a real update
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
