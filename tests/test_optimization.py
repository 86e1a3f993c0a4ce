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
from metatrain_mace.optimization import (
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
    decay, no_decay = parameter_groups(model, weight_decay=1e-3)
    assert decay["weight_decay"] == 1e-3 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    not_decayed = {names[id(p)] for p in no_decay["params"]}
    assert len(decayed) + len(not_decayed) == len(list(model.parameters()))
    assert "mace.interactions.0.linear.weight" in decayed
    assert any(n.startswith("mace.products.0.") for n in decayed)
    assert any(n.startswith("heads.mtt::charge.") for n in decayed)
    assert "mace.node_embedding.linear.weight" in not_decayed
    assert any(".conv_tp_weights." in n for n in not_decayed)
    assert any(n.startswith("mace.readouts.") for n in not_decayed)
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
