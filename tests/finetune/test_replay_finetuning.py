"""Multi-head replay fine-tuning: a new energy head copied from MACE's readout,
trained on new data while the original head keeps training on replay data."""

import copy
import logging
import re
import shutil
from pathlib import Path

import ase.io
import numpy as np
import pytest
import torch
from ase.calculators.lj import LennardJones
from ase.calculators.mixing import SumCalculator
from mace.calculators import MACECalculator
from metatomic.torch import ModelOutput, systems_to_torch
from metatomic_ase import MetatomicCalculator
from metatrain.cli.train import train_model
from metatrain.utils.neighbor_lists import get_system_with_neighbor_lists
from omegaconf import OmegaConf

from helpers.datasets import make_alloy
from helpers.mace_files import save_mace_model
from helpers.options import file_model, two_energies
from metatrain_mace.finetune.strategies import (
    INHERITED_KEY,
    READOUT_HEADS_KEY,
    apply_finetuning,
)
from metatrain_mace.model import MetaMACE


ENERGY = {"key": "REF_energy", "unit": "eV", "forces": {"key": "REF_forces"}}


def raw_energies(model: MetaMACE, frames: list) -> dict:
    """Per-atom outputs of both heads, before baselines and scales."""
    systems = [
        get_system_with_neighbor_lists(s, model.requested_neighbor_lists())
        for s in systems_to_torch(frames, dtype=torch.float64)
    ]
    model.train()
    outputs = {
        name: ModelOutput(sample_kind="atom") for name in ("energy", "energy/new")
    }
    result = model(systems, outputs)
    return {name: tensor.block().values.detach() for name, tensor in result.items()}


@pytest.mark.parametrize(
    "kwargs, head",
    [({}, None), ({"heads": ["pbe", "r2scan"], "pair_repulsion": True}, "r2scan")],
)
def test_new_head_is_a_copy_of_the_readout(
    tmp_path: Path, alloy_path: str, kwargs: dict, head: str, caplog
) -> None:
    path = save_mace_model(tmp_path / "file.model", atomic_numbers=[29, 79], **kwargs)
    model = MetaMACE(
        file_model(path, mace_head_name=head, head_hidden_sizes=[8]),
        two_energies([29, 79]),
    )
    frames = ase.io.read(alloy_path, ":3")
    before = raw_energies(model, frames)
    assert not torch.allclose(before["energy/new"], before["energy"])  # an MLP

    apply_finetuning(
        model,
        {"method": "full", "read_from": "x", "inherit_heads": {"energy/new": "energy"}},
    )
    after = raw_energies(model, frames)
    # the same readouts (and ZBL) on the same features: the very same numbers
    torch.testing.assert_close(after["energy/new"], after["energy"], rtol=0, atol=0)
    torch.testing.assert_close(after["energy"], before["energy"], rtol=0, atol=0)
    assert model.finetune_config[READOUT_HEADS_KEY] == ["energy/new"]
    # a copy, not the same modules: training one head leaves the other alone
    readout = model.heads["energy/new"].readouts[0]
    assert readout is not model.trunk.mace.readouts[0]

    with torch.no_grad():
        for parameter in model.heads["energy/new"].parameters():
            parameter.mul_(1.5)
    changed = raw_energies(model, frames)
    torch.testing.assert_close(changed["energy"], before["energy"], rtol=0, atol=0)

    # checkpoints rebuild the copied readouts before loading their weights
    checkpoint = copy.deepcopy(model.get_checkpoint())
    loaded = MetaMACE.load_checkpoint(checkpoint, context="export")
    reloaded = raw_energies(loaded, frames)
    for name in ("energy", "energy/new"):
        torch.testing.assert_close(reloaded[name], changed[name], rtol=0, atol=0)

    # a second fine-tuning with the same 'inherit_heads' keeps the trained copy
    # (it would otherwise start again from MACE's readout), and says so
    second = MetaMACE.load_checkpoint(copy.deepcopy(checkpoint), context="finetune")
    strategy = {"method": "full", "read_from": "x"}
    apply_finetuning(second, {**strategy, "inherit_heads": {"energy/new": "energy"}})
    kept = raw_energies(second, frames)
    for name in ("energy", "energy/new"):
        torch.testing.assert_close(kept[name], changed[name], rtol=0, atol=0)
    assert "'energy/new' was filled in and trained by an earlier" in caplog.text
    # the record goes on, also through a round without 'inherit_heads'
    apply_finetuning(second, strategy)
    assert second.finetune_config[INHERITED_KEY] == ["energy/new"]
    third = MetaMACE.load_checkpoint(copy.deepcopy(second.get_checkpoint()), "finetune")
    apply_finetuning(third, {**strategy, "inherit_heads": {"energy/new": "energy"}})
    torch.testing.assert_close(
        raw_energies(third, frames)["energy/new"], changed["energy/new"], rtol=0, atol=0
    )

    # and the exported (TorchScript) model offers both energies
    exported = loaded.export()
    exported.save(str(tmp_path / "model.pt"))
    new = MetatomicCalculator(str(tmp_path / "model.pt"), variants={"energy": "new"})
    loaded.eval()
    atoms = frames[0].copy()
    atoms.calc = new
    system = get_system_with_neighbor_lists(
        systems_to_torch(atoms, dtype=torch.float64), loaded.requested_neighbor_lists()
    )
    expected = loaded([system], {"energy/new": ModelOutput(sample_kind="system")})
    assert atoms.get_potential_energy() == pytest.approx(
        float(expected["energy/new"].block().values.detach()), abs=1e-10
    )


def test_readout_copy_errors(tmp_path: Path) -> None:
    path = save_mace_model(tmp_path / "file.model", atomic_numbers=[29, 79])
    model = MetaMACE(file_model(path, head_hidden_sizes=[8]), two_energies([29, 79]))
    with pytest.raises(ValueError, match="'energy/dft' is not a new target"):
        apply_finetuning(
            model,
            {
                "method": "full",
                "read_from": "x",
                "inherit_heads": {"energy/dft": "energy"},
            },
        )
    with pytest.raises(ValueError, match="'mtt::charge' is neither MACE's readout"):
        apply_finetuning(
            model,
            {
                "method": "full",
                "read_from": "x",
                "inherit_heads": {"energy/new": "mtt::charge"},
            },
        )


# ----------------------------------------------------------------- forgetting


def label(frames: list, calculator, noise: float, rng) -> list:
    """Energies and forces of ``calculator``, with Gaussian noise of ``noise`` eV
    per sqrt(atom) and eV/Å."""
    labelled = []
    for atoms in frames:
        atoms = atoms.copy()
        atoms.calc = calculator
        energy = atoms.get_potential_energy()
        forces = atoms.get_forces().copy()
        atoms.calc = None
        atoms.info = {"REF_energy": energy + noise * len(atoms) ** 0.5 * rng.normal()}
        atoms.arrays["REF_forces"] = forces + noise * rng.normal(size=forces.shape)
        labelled.append(atoms)
    return labelled


def errors(model: Path, data: Path) -> tuple:
    """RMSE of MACE's original head (``energy``) on ``data``: energy per atom
    (eV/atom) and forces (eV/Å), through metatomic's ASE calculator."""
    calculator = MetatomicCalculator(str(model))
    energy, forces = [], []
    for atoms in ase.io.read(data, ":"):
        atoms.calc = calculator
        energy.append((atoms.get_potential_energy() - atoms.info["REF_energy"]) / 8)
        forces.append(atoms.get_forces() - atoms.arrays["REF_forces"])
    return (
        float(np.sqrt(np.mean(np.square(energy)))),
        float(np.sqrt(np.mean(np.square(np.concatenate(forces))))),
    )


@pytest.mark.slow
def test_replay_keeps_the_original_head(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The original head's error on the replay data grows by less than 10% with
    replay, and by more without; the new head learns its data."""
    foundation = save_mace_model(tmp_path / "foundation.model", atomic_numbers=[29, 79])
    mace = MACECalculator(
        model_paths=str(foundation), device="cpu", default_dtype="float64"
    )
    rng = np.random.default_rng(0)
    # replay data: what the file predicts, to within 7 meV/atom and 20 meV/Å (a
    # foundation model fits its own training set less well than that)
    cells = ase.io.read(make_alloy(tmp_path / "a.xyz", 24, seed=1), ":")
    ase.io.write(tmp_path / "replay.xyz", label(cells, mace, 0.02, rng))
    # new data: another level of theory, the file's energies plus a pair potential
    other = SumCalculator(
        [mace, LennardJones(epsilon=0.05, sigma=2.3, rc=4.5, smooth=True)]
    )
    cells = ase.io.read(make_alloy(tmp_path / "b.xyz", 24, seed=2), ":")
    ase.io.write(tmp_path / "new.xyz", label(cells, other, 0.0, rng))

    def dataset(name: str, target: str) -> dict:
        return {
            "systems": {"read_from": str(tmp_path / name), "length_unit": "angstrom"},
            "targets": {target: ENERGY},
        }

    def train(name: str, training: dict, training_set) -> Path:
        options = {
            "seed": 0,
            "base_precision": 64,
            "architecture": {
                "name": "experimental.mace",
                "model": {"mace_model": str(foundation)},
                "training": {
                    "batch_size": 4,
                    "num_workers": 0,
                    "log_interval": 1,
                    **training,
                },
            },
            "training_set": training_set,
            "validation_set": 0.0,
            "test_set": 0.0,
        }
        run = tmp_path / "outputs" / name
        run.mkdir(parents=True)
        train_model(
            OmegaConf.create(options),
            output=str(tmp_path / f"{name}.pt"),
            checkpoint_dir=str(run),
        )
        return tmp_path / f"{name}.pt"

    start = train("start", {"num_epochs": 0}, dataset("replay.xyz", "energy"))
    finetune = {
        # mace-torch's multi-head fine-tuning rate
        "num_epochs": 6,
        "learning_rate": 1e-4,
        "finetune": {
            "method": "full",
            "read_from": str(tmp_path / "start.ckpt"),
            "inherit_heads": {"energy/new": "energy"},
        },
    }
    caplog.set_level(logging.INFO)
    caplog.clear()
    with_replay = train(
        "replay",
        # the replay weighs 10 times the new data (mace-torch's --weight_pt_head)
        {**finetune, "loss": {"energy": {"weight": 10.0, "forces": {"weight": 10.0}}}},
        [dataset("replay.xyz", "energy"), dataset("new.xyz", "energy/new")],
    )
    learned = [
        float(value)
        for value in re.findall(
            r"training forces\[energy/new\] RMSE: ([\d.]+)", caplog.text
        )
    ]
    without = train("plain", finetune, [dataset("new.xyz", "energy/new")])

    initial = errors(start, tmp_path / "replay.xyz")
    kept = errors(with_replay, tmp_path / "replay.xyz")
    lost = errors(without, tmp_path / "replay.xyz")
    growth_kept = [k / i - 1 for k, i in zip(kept, initial, strict=True)]
    growth_lost = [k / i - 1 for k, i in zip(lost, initial, strict=True)]
    print(
        f"original head on the replay data (energy eV/atom, forces eV/A): "
        f"start {initial}; with replay {kept}, growth {growth_kept}; without "
        f"{lost}, growth {growth_lost}; new head's force RMSE by epoch {learned}"
    )
    assert max(growth_kept) < 0.10
    assert max(growth_lost) > max(growth_kept) + 0.10
    # the new head learns: its force error falls every epoch
    assert len(learned) == 6
    assert all(b < a for a, b in zip(learned, learned[1:], strict=False))
    shutil.rmtree(tmp_path / "outputs")
