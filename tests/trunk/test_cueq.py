"""cuEquivariance backend (``enable_cueq``) against e3nn, on the CPU.

cuEquivariance runs its pure-torch path here (no GPU in CI); the kernels differ on
a GPU, the weights and the conversion tested here do not. References are the e3nn
model with the same weights: energies, forces, stress and every head agree to
1e-10 relative in float64, and so do the gradients of a training step.
"""

import copy
from typing import Dict

import ase.build
import pytest
import torch
from metatomic.torch import systems_to_torch
from metatrain.utils.architectures import get_default_hypers
from metatrain.utils.data import DatasetInfo
from metatrain.utils.data.target_info import get_energy_target_info
from metatrain.utils.evaluate_model import evaluate_model
from metatrain.utils.neighbor_lists import get_system_with_neighbor_lists

from helpers.datasets import mixed_structures
from helpers.mace_files import CHARGE_SPIN_SPECS, ELEMENTS, save_mace_model
from helpers.options import ORDINARY, default_model, train_options, two_energies
from helpers.parity import predict
from helpers.symmetry import all_kinds_dataset_info, structures
from metatrain_mace import MetaMACE
from metatrain_mace.trunk import backend, cueq


TOLERANCE = 1e-10


def _relative_errors(mine: Dict, reference: Dict) -> Dict[str, float]:
    assert mine.keys() == reference.keys()
    return {
        name: float((mine[name] - value).abs().max() / value.abs().max())
        for name, value in reference.items()
        if value.numel() > 0 and float(value.abs().max()) > 0
    }


def _on_cueq(model: MetaMACE) -> MetaMACE:
    twin = copy.deepcopy(model)
    twin.set_backend(True)
    assert twin.trunk.uses_cueq and backend.is_cueq(twin.trunk.mace)
    return twin


def test_hypers_built_model_on_cueq() -> None:
    """One model with correlation 3 and heads of every kind, moved to
    cuEquivariance once (its CPU fallback compiles these contractions in about
    half a minute): values, training gradients, and LoRA refused."""
    torch.manual_seed(0)
    hypers = default_model(**ORDINARY)
    info = all_kinds_dataset_info()
    model = MetaMACE(hypers, info).eval()
    with torch.no_grad():
        for parameter in model.heads.parameters():
            parameter.normal_()
    twin = _on_cueq(model)
    _values_agree(model, twin, info)
    _training_gradients_agree(model, twin, info)
    _lora_is_refused(twin)


def _values_agree(model: MetaMACE, twin: MetaMACE, info: DatasetInfo) -> None:
    """Energies, forces, stress and every head of every kind."""
    reference = predict(model, structures(), info)
    errors = _relative_errors(predict(twin, structures(), info), reference)
    for name in sorted(errors):
        print(f"{name}: relative error {errors[name]:.1e}")
    # energies, forces, stress and every head of every kind
    assert any("/positions" in name for name in errors)
    assert any("/strain" in name for name in errors)
    assert len(errors) >= 16
    assert max(errors.values()) < TOLERANCE, errors


def _training_gradients_agree(
    model: MetaMACE, twin: MetaMACE, info: DatasetInfo
) -> None:
    """The gradients of one loss, mapped from cuEquivariance's weights to e3nn's
    (the mapping is linear: concatenation and reshapes), equal e3nn's."""
    model.train()
    twin.train()
    systems = [
        get_system_with_neighbor_lists(system, model.requested_neighbor_lists())
        for system in systems_to_torch(structures(), dtype=torch.float64)
    ]
    for candidate in (model, twin):
        candidate.zero_grad()
        results = evaluate_model(candidate, systems, info.targets, is_training=True)
        loss = sum(
            (block.values**2).sum()
            for tensor in results.values()
            for block in tensor.blocks()
        )
        loss.backward()
    # gradients of the cuEquivariance trunk, moved to e3nn's layout
    gradients = copy.deepcopy(twin.trunk.mace)
    for holder, parameter in zip(
        gradients.parameters(), twin.trunk.mace.parameters(), strict=True
    ):
        holder.data = (
            parameter.grad.clone()
            if parameter.grad is not None
            else torch.zeros_like(parameter)
        )
    mapped = dict(cueq.convert(gradients, False).named_parameters())
    errors = {}
    for name, parameter in model.trunk.mace.named_parameters():
        if parameter.grad is None or not parameter.grad.abs().max() > 0:
            continue
        scale = float(parameter.grad.abs().max())
        errors[name] = float((mapped[name] - parameter.grad).abs().max()) / scale
    for name, parameter in model.heads.named_parameters():
        other = dict(twin.heads.named_parameters())[name]
        scale = float(parameter.grad.abs().max())
        errors["heads." + name] = (
            float((other.grad - parameter.grad).abs().max()) / scale
        )
    worst = max(errors, key=errors.get)
    print(f"largest relative gradient difference: {errors[worst]:.1e} ({worst})")
    assert any("symmetric_contractions" in name for name in errors)
    assert len(errors) > 20
    assert max(errors.values()) < TOLERANCE, max(errors.items(), key=lambda x: x[1])


FILE_KINDS = {
    "plain MACE": dict(scale_shift=False),
    "ScaleShiftMACE": dict(),
    "two heads": dict(heads=["pbe", "r2scan"]),
    "ZBL": dict(pair_repulsion=True),
    "charge and spin": dict(embedding_specs=CHARGE_SPIN_SPECS),
    "reduced coupling basis": dict(use_reduced_cg=True, heads=["pbe", "r2scan"]),
}


@pytest.mark.parametrize("kind", list(FILE_KINDS))
def test_file_model_agrees_with_e3nn(kind, tmp_path) -> None:
    path = save_mace_model(tmp_path / "file.model", **FILE_KINDS[kind])
    hypers = {
        **get_default_hypers("experimental.mace")["model"],
        "mace_model": str(path),
    }
    if "heads" in FILE_KINDS[kind]:
        hypers["mace_head_name"] = "r2scan"
    info = DatasetInfo(
        length_unit="angstrom",
        atomic_types=ELEMENTS,
        targets={
            "energy": get_energy_target_info(
                "energy",
                {"unit": "eV"},
                add_position_gradients=True,
                add_strain_gradients=True,
            )
        },
    )
    e3nn = MetaMACE(hypers, info).eval()
    on_cueq = MetaMACE({**hypers, "enable_cueq": True}, info).eval()
    assert on_cueq.trunk.uses_cueq and not e3nn.trunk.uses_cueq
    atoms_list = mixed_structures()
    errors = _relative_errors(
        predict(on_cueq, atoms_list, info), predict(e3nn, atoms_list, info)
    )
    print(kind, errors)
    assert len(errors) == 3
    assert max(errors.values()) < TOLERANCE, errors


def test_without_the_extra_enable_cueq_is_refused(monkeypatch) -> None:
    monkeypatch.setattr(backend, "cueq_available", lambda: False)
    hypers = default_model(**ORDINARY)
    with pytest.raises(ImportError, match=r"pip install 'metatrain-mace\[cueq\]'"):
        MetaMACE({**hypers, "enable_cueq": True}, all_kinds_dataset_info())


@pytest.mark.slow
def test_mtt_train_export_and_checkpoints_across_backends(tmp_path, caplog) -> None:
    """Two epochs of ``mtt train`` on cuEquivariance; the checkpoint holds e3nn
    weights and records the backend; export (e3nn) and every way of loading the
    checkpoint give the same energies and forces."""
    import logging

    import ase.io
    from metatomic_ase import MetatomicCalculator
    from metatrain.cli.train import train_model
    from metatrain.utils.io import load_model
    from omegaconf import OmegaConf

    from helpers.datasets import make_alloy

    # cuEquivariance's CPU fallback is slow: ten structures are enough here
    alloy_path = str(make_alloy(tmp_path / "alloy.xyz", n_structures=10))
    model = {
        **{k: ORDINARY[k] for k in ("r_max", "max_ell")},
        "hidden_irreps": "8x0e + 8x1o",
        "correlation": 2,
        "MLP_irreps": "8x0e",
        "radial_MLP": [16],
        "enable_cueq": True,
    }
    options = train_options(
        alloy_path,
        model,
        validation=0.2,
        num_epochs=1,  # the checks need trained weights, not a fit
        batch_size=4,
        log_interval=1,
        checkpoint_interval=1,
        # --restart loads the raw weights, the export the best (averaged) ones:
        # without the average they are the same, and the predictions comparable
        ema_decay=None,
    )
    (tmp_path / "run").mkdir()
    # mtt train exports from the checkpoint (e3nn weights)
    train_model(
        OmegaConf.create(options),
        output=str(tmp_path / "model.pt"),
        checkpoint_dir=str(tmp_path / "run"),
    )

    checkpoint = torch.load(tmp_path / "model.ckpt", weights_only=False)
    assert checkpoint["model_data"]["model_hypers"]["enable_cueq"] is True
    assert any(
        k.endswith("symmetric_contractions.contractions.0.weights_max")
        for k in checkpoint["model_state_dict"]
    )

    frames = ase.io.read(alloy_path, ":2")
    exported = MetatomicCalculator(
        str(tmp_path / "model.pt"), extensions_directory=None
    )

    def energies_forces(calculator):
        result = []
        for atoms in frames:
            atoms = atoms.copy()
            atoms.calc = calculator
            result.append((atoms.get_potential_energy(), atoms.get_forces()))
        return result

    reference = energies_forces(exported)
    assert not MetaMACE.load_checkpoint(
        copy.deepcopy(checkpoint), "export"
    ).trunk.uses_cueq
    # fine-tuning continues on the checkpoint's backend; restart() switches with
    # the same predictions
    model = MetaMACE.load_checkpoint(copy.deepcopy(checkpoint), "finetune")
    assert model.trunk.uses_cueq
    model = model.restart(model.dataset_info, model_hypers={"enable_cueq": False})
    assert not model.trunk.uses_cueq and model.hypers["enable_cueq"] is False
    path = str(tmp_path / "switched.pt")
    model.export().save(path)
    switched = energies_forces(MetatomicCalculator(path, extensions_directory=None))
    for (e0, f0), (e1, f1) in zip(reference, switched, strict=True):
        assert abs(e0 - e1) <= 1e-10 * abs(e0)
        assert abs(f0 - f1).max() <= 1e-10 * abs(f0).max()
    # --restart continues on the checkpoint's backend; exporting a model that runs
    # cuEquivariance gives e3nn, checked against it
    model = MetaMACE.load_checkpoint(copy.deepcopy(checkpoint), "restart")
    assert model.trunk.uses_cueq
    with caplog.at_level(logging.INFO):
        model.export().save(path)
    assert "Exporting with the e3nn backend" in caplog.text
    assert "trunks agree to" in caplog.text
    assert model.trunk.uses_cueq
    direct = energies_forces(MetatomicCalculator(path, extensions_directory=None))
    for (e0, f0), (e1, f1) in zip(reference, direct, strict=True):
        assert abs(e0 - e1) <= 1e-10 * abs(e0)
        assert abs(f0 - f1).max() <= 1e-10 * abs(f0).max()
    # --restart cannot change the backend (the optimizer state is the other's):
    # the trainer of the restarted checkpoint refuses it before training
    from metatrain_mace import Trainer

    trainer = Trainer.load_checkpoint(
        copy.deepcopy(checkpoint), checkpoint["train_hypers"], "restart"
    )
    trainer.state.check_backend(model)  # the same backend continues
    e3nn_model = MetaMACE.load_checkpoint(copy.deepcopy(checkpoint), "finetune")
    e3nn_model = e3nn_model.restart(
        e3nn_model.dataset_info, model_hypers={"enable_cueq": False}
    )
    with pytest.raises(ValueError, match="'enable_cueq' changed on --restart"):
        trainer.train(
            e3nn_model,
            torch.float64,
            [torch.device("cpu")],
            [],
            [],
            str(tmp_path / "run"),
        )
    # mtt export of the checkpoint
    assert load_model(str(tmp_path / "model.ckpt")) is not None


def _lora_is_refused(twin: MetaMACE) -> None:
    from metatrain_mace.finetune.strategies import apply_finetuning

    with pytest.raises(ValueError, match="LoRA fine-tuning runs on e3nn only"):
        apply_finetuning(twin, {"method": "lora", "config": {"rank": 2, "alpha": 1.0}})


def test_readout_heads_follow_the_trunk(tmp_path) -> None:
    """A readout head (a copy of MACE's readouts, replay fine-tuning) moves to
    cuEquivariance with the trunk, and back with its own weights."""

    from metatrain_mace.finetune.strategies import apply_finetuning

    path = save_mace_model(tmp_path / "file.model", atomic_numbers=[29, 79])
    hypers = {
        **get_default_hypers("experimental.mace")["model"],
        "mace_model": str(path),
        "head_hidden_sizes": [8],
    }
    info = two_energies([29, 79])
    model = MetaMACE(hypers, info)
    apply_finetuning(
        model,
        {"method": "full", "read_from": "x", "inherit_heads": {"energy/new": "energy"}},
    )
    with torch.no_grad():
        for parameter in model.heads["energy/new"].parameters():
            parameter.mul_(1.5)
    model.eval()
    cell = ase.build.bulk("Cu", "fcc", a=3.7, cubic=True) * (2, 1, 1)
    cell.numbers[::3] = 79
    cell.rattle(0.08, seed=2)
    reference = predict(model, [cell], info)
    assert not torch.allclose(reference["energy[0]"], reference["energy/new[0]"])

    on_cueq = _on_cueq(model)
    moved = type(on_cueq.heads["energy/new"].readouts[0].linear)
    assert moved is type(on_cueq.trunk.mace.readouts[0].linear)
    assert moved is not type(model.trunk.mace.readouts[0].linear)
    errors = _relative_errors(predict(on_cueq, [cell], info), reference)
    assert set(errors) == {"energy[0]", "energy/new[0]"}
    assert max(errors.values()) < TOLERANCE, errors
    back = on_cueq.e3nn_copy()
    assert not back.trunk.uses_cueq
    errors = _relative_errors(predict(back, [cell], info), reference)
    assert max(errors.values()) < TOLERANCE, errors
