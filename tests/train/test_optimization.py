"""Optimizer groups (MACE-style weight decay), fused updates and LR schedules."""

import pytest
import torch
from metatrain.utils.architectures import get_default_hypers
from metatrain.utils.data import DatasetInfo
from metatrain.utils.data.target_info import (
    get_energy_target_info,
    get_generic_target_info,
)

from metatrain_mace import MetaMACE
from metatrain_mace.train.optimizer import (
    block_of,
    build_optimizer,
    build_scheduler,
    parameter_groups,
    step_scheduler,
)


NAME = "experimental.mace"


@pytest.fixture
def model() -> MetaMACE:
    hypers = get_default_hypers(NAME)["model"]
    hypers.update(hidden_irreps="4x0e + 4x1o", radial_MLP=[8], head_hidden_sizes=[8])
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
    return MetaMACE(
        hypers,
        DatasetInfo(length_unit="angstrom", atomic_types=[1, 6], targets=targets),
    ).to(torch.float64)


def trainer_hypers(**changes):
    hypers = get_default_hypers(NAME)["training"]
    hypers.update(changes)
    return hypers


def test_weight_decay_groups(model) -> None:
    groups = parameter_groups(
        model, weight_decay=1e-3, learning_rate=0.1, lr_factors={"products": 0.5}
    )
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = set()
    not_decayed = set()
    for group in groups:
        block, decay = group["name"].split("/")
        members = {names[id(p)] for p in group["params"]}
        assert all(block_of(n) == block for n in members)
        (decayed if decay == "decay" else not_decayed).update(members)
        assert group["weight_decay"] == (1e-3 if decay == "decay" else 0.0)
        factor = 0.5 if block == "products" else 1.0
        assert group["lr"] == pytest.approx(0.1 * factor)
        assert group["lr_factor"] == factor
    assert len(decayed) + len(not_decayed) == len(list(model.parameters()))
    assert "trunk.mace.interactions.0.linear.weight" in decayed
    assert any(n.startswith("trunk.mace.products.0.") for n in decayed)
    assert any(n.startswith("heads.mtt::charge.") for n in decayed)
    assert "trunk.mace.node_embedding.linear.weight" in not_decayed
    assert any(".conv_tp_weights." in n for n in not_decayed)
    assert any(n.startswith("trunk.mace.readouts.") for n in not_decayed)
    assert not any(n.endswith("bias") for n in decayed)


@pytest.mark.parametrize("name, reference", [("adam", "Adam"), ("adamw", "AdamW")])
def test_fused_update_equals_reference(model, name, reference) -> None:
    """The fused optimizer makes the same steps as torch's per-parameter loop."""
    hypers = trainer_hypers(optimizer=name, weight_decay=1e-2, learning_rate=1e-2)
    optimizer = build_optimizer(model, hypers)
    assert all(group["fused"] for group in optimizer.param_groups)
    assert all(group["amsgrad"] for group in optimizer.param_groups)

    clone = {
        n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()
    }
    names = {id(p): n for n, p in model.named_parameters()}
    groups = [
        {
            "params": [clone[names[id(p)]] for p in group["params"]],
            "weight_decay": group["weight_decay"],
        }
        for group in optimizer.param_groups
    ]
    expected = getattr(torch.optim, reference)(
        groups, lr=1e-2, amsgrad=True, betas=(hypers["beta"], 0.999), foreach=False
    )
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):
        for n, p in model.named_parameters():
            grad = torch.randn(p.shape, generator=generator, dtype=p.dtype)
            p.grad = grad
            clone[n].grad = grad.clone()
        optimizer.step()
        expected.step()
    changed = 0
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), clone[n].detach(), rtol=1e-12, atol=0)
        changed += 1
    assert changed > 10


def test_schedulers(model) -> None:
    hypers = trainer_hypers(
        lr_scheduler="ExponentialLR", lr_scheduler_gamma=0.5, learning_rate=1.0
    )
    optimizer = build_optimizer(model, hypers)
    scheduler = build_scheduler(optimizer, hypers)
    step_scheduler(scheduler, 1.0)
    step_scheduler(scheduler, 1.0)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.25)

    hypers = trainer_hypers(
        lr_scheduler="ReduceLROnPlateau",
        lr_factor=0.1,
        lr_scheduler_patience=1,
        learning_rate=1.0,
    )
    optimizer = build_optimizer(model, hypers)
    scheduler = build_scheduler(optimizer, hypers)
    for loss in [1.0, 2.0]:  # one bad epoch: within the patience
        step_scheduler(scheduler, loss)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1.0)
    step_scheduler(scheduler, 2.0)  # second bad epoch: reduce
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.1)


# --- frozen layers and per-block learning rates ------------------------------------


@pytest.fixture(scope="module")
def alloy4(tmp_path_factory):
    from metatrain.utils.data import get_atomic_types, get_dataset
    from metatrain.utils.omegaconf import expand_dataset_config
    from omegaconf import OmegaConf

    from helpers.datasets import ALLOY_TARGETS, make_alloy

    path = make_alloy(tmp_path_factory.mktemp("alloy4") / "a.xyz", n_structures=4)
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
    return dataset, info


def train_epochs(dataset, info, epochs: int, state=None, trainer=None, **changes):
    """A small model (built with seed 0, or loaded from ``state``) trained for
    ``epochs`` epochs of one step each (the batch holds all 4 structures)."""
    from metatrain_mace import Trainer

    hypers = get_default_hypers(NAME)
    model_hypers = hypers["model"]
    model_hypers.update(hidden_irreps="4x0e + 4x1o", radial_MLP=[8], r_max=4.5)
    torch.manual_seed(0)
    model = MetaMACE(model_hypers, info)
    if state is not None:
        model.load_state_dict(state)
    training = hypers["training"]
    training.update(
        num_epochs=epochs,
        batch_size=4,
        num_workers=0,
        learning_rate=0.01,
        loss={
            "energy": {
                "type": "mse",
                "weight": 1.0,
                "reduction": "mean",
                "gradients": {
                    "positions": {"type": "mse", "weight": 1.0, "reduction": "mean"},
                    "strain": {"type": "mse", "weight": 1.0, "reduction": "mean"},
                },
            }
        },
        **changes,
    )
    trainer = trainer or Trainer(training)
    trainer.hypers = training
    trainer.train(
        model, torch.float64, [torch.device("cpu")], [dataset], [dataset], "."
    )
    return model, trainer


def moved(before: dict, after: dict) -> set:
    return {
        name
        for name, value in before.items()
        if value.is_floating_point() and not torch.equal(value, after[name])
    }


@pytest.mark.slow
def test_frozen_layers_stay_bit_identical(alloy4, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    dataset, info = alloy4
    initial = train_epochs(dataset, info, 0)[0].state_dict()
    initial = {k: v.clone() for k, v in initial.items()}
    model, trainer = train_epochs(dataset, info, 1, frozen_layers=1)
    changed = moved(initial, model.state_dict())
    frozen = (
        "trunk.mace.node_embedding.",
        "trunk.mace.interactions.0.",
        "trunk.mace.products.0.",
    )
    assert not any(n.startswith(frozen) for n in changed), changed
    assert any(n.startswith("trunk.mace.interactions.1.") for n in changed)
    assert any(n.startswith("trunk.mace.readouts.") for n in changed)

    # a restart with the same hypers keeps them frozen
    checkpoint = model.get_checkpoint()
    trainer.save_checkpoint(model, tmp_path / "restart.ckpt")
    checkpoint = torch.load(tmp_path / "restart.ckpt", weights_only=False)
    from metatrain_mace import Trainer

    restarted = MetaMACE.load_checkpoint(checkpoint, "restart")
    trainer = Trainer.load_checkpoint(checkpoint, trainer.hypers, "restart")
    trainer.hypers["num_epochs"] = 3
    trainer.train(
        restarted, torch.float64, [torch.device("cpu")], [dataset], [dataset], "."
    )
    assert trainer.epoch == 2
    changed = moved(initial, restarted.state_dict())
    assert not any(n.startswith(frozen) for n in changed), changed

    with pytest.raises(ValueError, match="'frozen_layers' is 3, but the MACE model"):
        train_epochs(dataset, info, 1, frozen_layers=3)


@pytest.mark.slow
def test_learning_rate_factors(alloy4, tmp_path, monkeypatch) -> None:
    """Adam's first step is lr * g / (|g| + eps): a factor scales it exactly."""
    monkeypatch.chdir(tmp_path)
    dataset, info = alloy4
    initial = {
        k: v.clone() for k, v in train_epochs(dataset, info, 0)[0].state_dict().items()
    }
    full = train_epochs(dataset, info, 1)[0].state_dict()
    scaled = train_epochs(
        dataset, info, 1, lr_factors={"readouts": 0.1, "products": 0.0}
    )[0].state_dict()
    readouts = [
        n for n in initial if n.startswith("trunk.mace.readouts.") and "weight" in n
    ]
    assert readouts
    for name in readouts:
        step_full = full[name] - initial[name]
        step_scaled = scaled[name] - initial[name]
        assert step_full.abs().max() > 1e-4
        torch.testing.assert_close(step_scaled, 0.1 * step_full, rtol=1e-9, atol=1e-15)
    products = [n for n in initial if n.startswith("trunk.mace.products.")]
    assert all(torch.equal(scaled[n], initial[n]) for n in products)
    assert any(not torch.equal(full[n], initial[n]) for n in products)


@pytest.mark.slow
def test_frozen_layers_with_lora(alloy4, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    dataset, info = alloy4
    finetune = {
        "method": "lora",
        "read_from": "unused.ckpt",
        "config": {"rank": 2, "alpha": 4.0},
    }
    model, _ = train_epochs(dataset, info, 0)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model, _ = train_epochs(
        dataset, info, 1, state=state, finetune=finetune, frozen_layers=1
    )
    after = model.state_dict()
    adapters = [n for n in after if ".lora_" in n]
    assert any(n.startswith("trunk.mace.interactions.1.") for n in adapters)
    from metatrain_mace.finetune import lora

    # LoRA's up-projections start at zero: the trainable ones moved, those of the
    # frozen first layer did not
    for name in adapters:
        if not name.endswith("lora_up.weight"):
            continue
        if name.startswith(("trunk.mace.interactions.0.", "trunk.mace.products.0.")):
            assert torch.all(after[name] == 0), name
    assert any(
        n.endswith("lora_up.weight")
        and n.startswith("trunk.mace.interactions.1.")
        and after[n].abs().max() > 0
        for n in adapters
    )
    assert lora.adapters(model)


def test_nothing_to_train_is_refused_with_the_cause(model) -> None:
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="No parameter of the model trains.*frozen"):
        build_optimizer(model, trainer_hypers())
