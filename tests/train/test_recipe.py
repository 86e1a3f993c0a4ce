"""MACE's training recipe: the weight average (EMA) and stage two."""

import copy
import json
import logging
import re
from pathlib import Path

import ase.io
import pytest
import torch
from metatrain.cli.train import train_model
from omegaconf import OmegaConf

from helpers.options import small_options
from metatrain_mace.train.recipe import WeightAverage, stage_two_loss


def test_weight_average_is_the_exponential_moving_average() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 1)).double()
    history = [[p.detach().clone() for p in model.parameters()]]
    average = WeightAverage(model, decay=0.9)
    for _ in range(5):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        history.append([p.detach().clone() for p in model.parameters()])
        average.update(model)
    # W_0 = W_model(0); W_t = d_t W_{t-1} + (1 - d_t) W_model(t), with torch_ema's
    # warm-up d_t = min(0.9, (1 + t) / (10 + t)) for t = 0, 1, ... updates before
    expected = history[0]
    for t, step in enumerate(history[1:]):
        d = min(0.9, (1 + t) / (10 + t))
        expected = [d * e + (1 - d) * s for e, s in zip(expected, step, strict=True)]
    assert average.current_decay() == pytest.approx(6 / 15)  # after 5 updates
    for got, want in zip(average.average, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)

    raw = [p.detach().clone() for p in model.parameters()]
    with average.applied(model):
        for p, want in zip(model.parameters(), expected, strict=True):
            torch.testing.assert_close(p.detach(), want, rtol=0, atol=1e-12)
    for p, want in zip(model.parameters(), raw, strict=True):
        assert torch.equal(p.detach(), want)  # the raw weights are back, exactly

    restored = WeightAverage(model, decay=0.9)
    assert restored.load_state_dict(average.state_dict())
    assert restored.updates == 5
    assert not WeightAverage(torch.nn.Linear(2, 2), 0.9).load_state_dict(
        average.state_dict()
    )


def test_stage_two_loss_is_put_over_the_loss() -> None:
    loss = {
        "energy": {
            "type": "mse",
            "weight": 1.0,
            "reduction": "mean",
            "gradients": {"positions": {"type": "mse", "weight": 10.0}},
        }
    }
    two = stage_two_loss(loss, {"energy": {"weight": 1000.0, "forces": {"weight": 1}}})
    assert two["energy"]["weight"] == 1000.0
    assert two["energy"]["gradients"]["positions"] == {"type": "mse", "weight": 1}
    assert loss["energy"]["weight"] == 1.0  # not modified
    assert stage_two_loss(loss, "mae")["energy"]["gradients"]["positions"]["type"] == (
        "mae"
    )
    with pytest.raises(ValueError, match="'dipole', which is not a target"):
        stage_two_loss(loss, {"dipole": {"weight": 2.0}})
    with pytest.raises(ValueError, match="sets the strain gradient of 'energy'"):
        stage_two_loss(loss, {"energy": {"stress": {"weight": 2.0}}})


def train(config: dict, workdir: Path, name: str, restart=None) -> Path:
    run = workdir / "outputs" / name
    run.mkdir(parents=True)
    train_model(
        OmegaConf.create(copy.deepcopy(config)),
        output=str(workdir / f"{name}.pt"),
        checkpoint_dir=str(run),
        restart_from=None if restart is None else str(restart),
    )
    return run


@pytest.mark.slow
def test_ema_and_stage_two_in_training(
    alloy_path: str,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    frames = ase.io.read(alloy_path, ":16")
    ase.io.write(tmp_path / "data.xyz", frames, format="extxyz")
    config = small_options(
        tmp_path / "data.xyz",
        num_epochs=4,
        batch_size=4,
        ema_decay=0.9,
        stage_two_epoch=2,
        stage_two_loss={"energy": {"weight": 1000.0, "forces": {"weight": 100.0}}},
        stage_two_learning_rate=1e-3,
    )
    caplog.set_level(logging.INFO)
    train(config, tmp_path, "first")
    assert "Stage two from epoch 2" in caplog.text
    assert "Exponential moving average of the weights, decay 0.9" in caplog.text
    checkpoint = torch.load(tmp_path / "first.ckpt", weights_only=False)
    # SWALR reached the stage-two rate within one epoch
    for group in checkpoint["optimizer_state_dict"]["param_groups"]:
        assert group["lr"] == pytest.approx(1e-3 * group.get("lr_factor", 1.0))
    # the best model is tracked afresh from stage two on, and is the average
    assert checkpoint["best_epoch"] >= 2
    ema = checkpoint["ema_state"]
    assert ema["updates"] == 4 * 3  # 12 training structures, batch 4, 4 epochs
    if checkpoint["best_epoch"] == 3:
        for name, value in ema["average"].items():
            assert torch.equal(checkpoint["best_model_state_dict"][name], value)
    raw = checkpoint["model_state_dict"]
    assert any(
        not torch.equal(raw[name], value) for name, value in ema["average"].items()
    )

    # a restart continues the average and stays in stage two
    config["architecture"]["training"]["num_epochs"] = 5
    caplog.clear()
    train(config, tmp_path, "second", restart=tmp_path / "first.ckpt")
    restarted = torch.load(tmp_path / "second.ckpt", weights_only=False)
    assert restarted["ema_state"]["updates"] == 5 * 3
    assert "Stage two from epoch 4" in caplog.text
    assert restarted["best_metric"] <= checkpoint["best_metric"]
    for group in restarted["optimizer_state_dict"]["param_groups"]:
        assert group["lr"] == pytest.approx(1e-3 * group.get("lr_factor", 1.0))

    monkeypatch.chdir(tmp_path)  # mtt eval writes its predictions into the cwd
    check_parity_plot(tmp_path / "second.pt", tmp_path / "data.xyz", caplog)


def check_parity_plot(
    model_path: Path, data: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """mtt eval's predictions against the references, as drawn by metatrain-mace
    plot: the plotted pairs are metatomic's ASE calculator against the data, and
    the RMSE in the picture is the one mtt eval logs."""
    from metatomic.torch import load_atomistic_model
    from metatomic_ase import MetatomicCalculator
    from metatrain.cli.eval import eval_model
    from PIL import Image

    from metatrain_mace.tools.cli import main

    references = data.parent / "eval.yaml"
    references.write_text(
        f"systems:\n  read_from: {data.name}\n  length_unit: angstrom\n"
        "targets:\n  energy:\n    key: REF_energy\n    unit: eV\n"
        "    forces:\n      key: REF_forces\n    stress:\n      key: REF_stress\n"
    )
    predictions = data.parent / "predictions.xyz"
    caplog.clear()
    eval_model(
        load_atomistic_model(str(model_path)),
        OmegaConf.create(
            {
                "systems": {"read_from": str(data), "length_unit": "angstrom"},
                "targets": {
                    "energy": {
                        "key": "REF_energy",
                        "unit": "eV",
                        "forces": {"key": "REF_forces"},
                        "stress": {"key": "REF_stress"},
                    }
                },
            }
        ),
        output=predictions.name,
    )
    main(["plot", "--predictions", str(predictions), "--references", str(references)])
    image = Image.open(data.parent / "predictions-parity.png")
    panels = json.loads(image.text["Description"])
    assert set(panels) == {"energy per atom", "forces", "stress"}

    frames = ase.io.read(data, ":")
    calculator = MetatomicCalculator(str(model_path))
    energies, forces, stresses = [], [], []
    for atoms in frames:
        atoms.calc = calculator
        energies.append(atoms.get_potential_energy() / len(atoms))
        forces.extend(atoms.get_forces().reshape(-1))
        stresses.extend(atoms.get_stress(voigt=False).reshape(-1))
    reference = [a.info["REF_energy"] / len(a) for a in frames]
    torch.testing.assert_close(panels["energy per atom"]["reference"], reference)
    torch.testing.assert_close(
        panels["energy per atom"]["prediction"], energies, rtol=0, atol=1e-9
    )
    # per-atom arrays of an xyz file carry 8 decimals (forces); per-structure
    # values are written whole
    torch.testing.assert_close(
        panels["forces"]["prediction"], forces, atol=6e-9, rtol=0
    )
    torch.testing.assert_close(
        panels["stress"]["prediction"], stresses, atol=1e-9, rtol=0
    )
    # mtt eval logs the RMSE of the energy per atom and of the forces in meV
    logged = re.search(r"energy RMSE \(per atom\): ([\d.]+) meV", caplog.text)
    assert logged is not None
    assert panels["energy per atom"]["rmse"] * 1000 == pytest.approx(
        float(logged.group(1)), rel=1e-3, abs=0.06
    )


TRAIN_CSV = """Epoch,learning rate,training loss,training energy RMSE (per atom),\
validation loss,validation energy RMSE (per atom)
,,,meV,,meV
   0,1.000e-02,1.595e+03,114.72,1.7e+03,120.5
   1,1.000e-02,1.191e+03,101.61,1.2e+03,99.0
   2,5.000e-03,9.105e+02,80.00,9.5e+02,85.25
   3,1.000e-03,5.000e+02,60.50,6.0e+02,70.0
"""


def test_plot_training_curves(tmp_path: Path) -> None:
    from PIL import Image

    from metatrain_mace.tools.cli import main
    from metatrain_mace.tools.plotting import plot_training

    (tmp_path / "train.csv").write_text(TRAIN_CSV)
    (tmp_path / "train.log").write_text(
        "[...][INFO] - Stage two from epoch 2: loss ..., learning rate 0.001\n"
    )
    written = plot_training(tmp_path)
    assert written == tmp_path / "training-curves.png"
    image = Image.open(written)
    assert image.size[0] > 300 and image.size[1] > 300
    plotted = json.loads(image.text["Description"])
    assert plotted["epochs"] == [0, 1, 2, 3]
    assert plotted["stage_two_epoch"] == 2
    columns = plotted["columns"]
    assert columns["validation energy RMSE (per atom)"] == [120.5, 99.0, 85.25, 70.0]
    assert columns["learning rate"] == [1e-2, 1e-2, 5e-3, 1e-3]

    main(["plot", str(tmp_path), "-o", str(tmp_path / "curves.png")])
    assert (tmp_path / "curves.png").is_file()
    with pytest.raises(SystemExit) as error:
        main(["plot", str(tmp_path / "missing")])
    assert error.value.code == 2
    with pytest.raises(SystemExit) as error:
        main(["plot", "--predictions", "predictions.xyz"])
    assert error.value.code == 2
