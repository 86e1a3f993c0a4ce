"""Models of this package written back as mace-torch model files (``to-mace``).

Reference: MACE's own calculator on the written file must give what our exported
model gives (energy, forces, stress, 1e-10 in float64), for every kind of model:
built from hypers, fine-tuned from a MACE file (full, heads, frozen layers, LoRA,
replay heads), multi-head with ZBL, charge/spin, cuEquivariance-trained.
"""

import copy
import gzip
import logging
import shutil
import sys
from pathlib import Path
from typing import Callable, Dict, Optional

import ase.build
import numpy as np
import pytest
import torch
from metatomic_ase import MetatomicCalculator
from metatrain.utils.data import DatasetInfo
from metatrain.utils.data.target_info import get_generic_target_info

from helpers.datasets import mixed_structures
from helpers.mace_files import CHARGE_SPIN_SPECS, ELEMENTS, save_mace_model
from helpers.options import (
    LORA_WITH_REPLAY_HEAD,
    ORDINARY,
    default_model,
    default_training,
    energy_dataset_info,
    file_model,
    two_energies,
)
from helpers.parity import (
    STATES,
    charged_structures,
    evaluate,
    evaluate_charged,
    mace_calculator,
)
from metatrain_mace import MetaMACE
from metatrain_mace.finetune.strategies import apply_finetuning
from metatrain_mace.tools import cli
from metatrain_mace.tools.to_mace import to_mace_module, write_mace_file
from metatrain_mace.train.baselines import fit_baselines
from metatrain_mace.train.optimizer import freeze_layers
from metatrain_mace.trunk import backend


CHECKPOINTS = Path(__file__).parents[1] / "checkpoints"


def _dipole_info(types) -> DatasetInfo:
    """``energy`` and a per-structure Cartesian dipole (not a MACE readout)."""
    info = energy_dataset_info(types)
    dipole = get_generic_target_info(
        "mtt::dipole",
        {
            "quantity": "",
            "unit": "",
            "type": {"cartesian": {"rank": 1}},
            "num_subtargets": 1,
            "sample_kind": "system",
        },
    )
    return DatasetInfo(
        length_unit="angstrom",
        atomic_types=types,
        targets={**info.targets, "mtt::dipole": dipole},
    )


def _baselines(model: MetaMACE, tmp_path: Path, **fixed) -> MetaMACE:
    """Fix the composition baseline and the scales (no data needed)."""
    fit_baselines(model, default_training(**fixed), [], str(tmp_path / "baselines"))
    return model


def _perturb(model: MetaMACE, seed: int = 1) -> MetaMACE:
    """Move every trainable weight, as training would."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad and parameter.numel() > 0:
                parameter.add_(0.1 * torch.randn_like(parameter))
    return model.eval()


def _file(tmp_path: Path, **kwargs) -> Path:
    return save_mace_model(tmp_path / "source.model", **kwargs)


def _hypers_built(tmp_path: Path) -> MetaMACE:
    types = [1, 6, 8, 13, 29, 79]
    model = MetaMACE(default_model(**ORDINARY), _dipole_info(types))
    model.set_avg_num_neighbors(7.5)
    baseline = {z: -1.0 - 0.3 * i for i, z in enumerate(types)}
    _baselines(
        model,
        tmp_path,
        atomic_baseline={"energy": baseline},
        fixed_scaling_weights={"energy": 1.7, "mtt::dipole": 0.3},
    )
    return _perturb(model)


BASELINE = {"energy": {z: -1.5 + 0.2 * i for i, z in enumerate(ELEMENTS)}}


def _hypers_charge_spin(tmp_path: Path) -> MetaMACE:
    hypers = default_model(
        **ORDINARY, embedding_specs=CHARGE_SPIN_SPECS, use_embedding_readout=True
    )
    model = MetaMACE(hypers, energy_dataset_info(ELEMENTS))
    model.set_avg_num_neighbors(7.5)
    _baselines(
        model, tmp_path, atomic_baseline=BASELINE, fixed_scaling_weights={"energy": 2.1}
    )
    return _perturb(model)


def _fine_tuned(method: str, **file_kwargs) -> Callable[[Path], MetaMACE]:
    def build(tmp_path: Path) -> MetaMACE:
        head = "r2scan" if "heads" in file_kwargs else None
        hypers = file_model(_file(tmp_path, **file_kwargs), mace_head_name=head)
        model = MetaMACE(hypers, energy_dataset_info(ELEMENTS))
        if method == "frozen layers":
            apply_finetuning(model, {"method": "full", "read_from": "x"})
            freeze_layers(model, 1)
        else:
            apply_finetuning(model, {"method": method, "read_from": "x"})
        # the file's E0s and scale, then a new scale as a refit would give
        _baselines(model, tmp_path, fixed_scaling_weights={"energy": 1.3})
        return _perturb(model)

    return build


def _lora_and_replay_head(tmp_path: Path) -> MetaMACE:
    hypers = file_model(_file(tmp_path, pair_repulsion=True), head_hidden_sizes=[8])
    model = MetaMACE(hypers, two_energies(ELEMENTS))
    apply_finetuning(model, copy.deepcopy(LORA_WITH_REPLAY_HEAD))
    new = {z: 0.4 * i - 2.0 for i, z in enumerate(ELEMENTS)}
    _baselines(
        model,
        tmp_path,
        atomic_baseline={"energy/new": new},
        fixed_scaling_weights={"energy/new": 0.7},
    )
    return _perturb(model)


def _cueq(tmp_path: Path) -> MetaMACE:
    model = _fine_tuned("full", heads=["pbe", "r2scan"])(tmp_path)
    model.set_backend(True)
    return model


KINDS: Dict[str, Callable[[Path], MetaMACE]] = {
    "hypers-built, with a dipole": _hypers_built,
    "file, full fine-tuning": _fine_tuned("full"),
    "file, heads": _fine_tuned("heads"),
    "file, frozen layers": _fine_tuned("frozen layers"),
    "multi-head file with ZBL": _fine_tuned("full", heads=["pbe", "r2scan"]),
    "file, LoRA and a replay head": _lora_and_replay_head,
    "cuEquivariance-trained": _cueq,
}


def _assert_parity(
    exported: Path,
    written: Path,
    variant: Optional[str],
    head: Optional[str] = None,
    frames: Optional[list] = None,
) -> None:
    ours = MetatomicCalculator(
        str(exported),
        device="cpu",
        variants={} if variant is None else {"energy": variant},
    )
    reference = mace_calculator(written, head, "float64")
    for atoms in mixed_structures() if frames is None else frames:
        e, f, s = evaluate(ours, atoms)
        e_ref, f_ref, s_ref = evaluate(reference, atoms)
        # measured: 0 to 4e-15 eV, 2e-16 eV/A
        assert abs(e - e_ref) <= 1e-10, (e, e_ref)
        assert np.abs(f - f_ref).max() <= 1e-10
        assert np.abs(s - s_ref).max() <= 1e-10


@pytest.mark.parametrize("kind", list(KINDS))
def test_mace_calculator_on_the_written_file_equals_our_export(
    tmp_path, kind, caplog
) -> None:
    if kind == "cuEquivariance-trained" and not backend.cueq_available():
        pytest.fail("cuequivariance-torch is part of the test extra")
    model = KINDS[kind](tmp_path)
    exported = tmp_path / "model.pt"
    model.export().save(str(exported))
    targets = [model.mace_head_target] + list(model.heads.readout_heads)
    for target in targets:
        with caplog.at_level(logging.INFO):
            mace = to_mace_module(model, target)
        # only mace-torch's classes: every MACE engine can read the file
        assert type(mace).__name__ == "ScaleShiftMACE"
        for module in mace.modules():
            assert type(module).__module__.split(".")[0] in ("mace", "e3nn", "torch")
        written = tmp_path / "written.model"
        torch.save(mace, written)
        variant = None if target == "energy" else target.split("/")[1]
        # a multi-head file keeps its heads; the chosen one is the target's
        head = mace.heads[model.trunk.head_index] if len(mace.heads) > 1 else None
        _assert_parity(exported, written, variant, head)
    left_out = [t for t in model.target_names if t != targets[-1]]
    if left_out:
        assert "Left out of the MACE file" in caplog.text
        assert str(left_out) in caplog.text


def test_charge_and_spin_models(tmp_path, caplog) -> None:
    models = {
        "file": _fine_tuned(
            "full", embedding_specs=CHARGE_SPIN_SPECS, use_embedding_readout=True
        )(tmp_path),
        "hypers": _hypers_charge_spin(tmp_path),
    }
    for name, model in models.items():
        exported = tmp_path / f"{name}.pt"
        model.export().save(str(exported))
        written = tmp_path / f"{name}.model"
        with caplog.at_level(logging.INFO):
            torch.save(to_mace_module(model), written)
        assert "symmetrix-xl 0.1.1 ignores them" in caplog.text
        ours = MetatomicCalculator(str(exported), device="cpu")
        reference = mace_calculator(written, None, "float64")
        for atoms in charged_structures():
            energies = []
            for charge, spin in STATES:
                e, f, s = evaluate_charged(ours, atoms, charge, spin)
                e_ref, f_ref, s_ref = evaluate_charged(reference, atoms, charge, spin)
                assert abs(e - e_ref) <= 1e-10, (name, charge, spin, e, e_ref)
                assert np.abs(f - f_ref).max() <= 1e-10
                assert np.abs(s - s_ref).max() <= 1e-10
                energies.append(e)
            assert abs(energies[1] - energies[0]) > 1e-4, (name, energies)


def test_float32_files(tmp_path) -> None:
    model = _fine_tuned("full", pair_repulsion=True)(tmp_path)
    exported = tmp_path / "model.pt"
    model.export().save(str(exported))
    written = tmp_path / "written.model"
    mace = to_mace_module(model, dtype="float32")
    assert {p.dtype for p in mace.parameters()} == {torch.float32}
    torch.save(mace, written)
    ours = MetatomicCalculator(str(exported), device="cpu")
    reference = mace_calculator(written, None, "float32")
    for atoms in mixed_structures():
        e, f, _ = evaluate(ours, atoms)
        e_ref, f_ref, _ = evaluate(reference, atoms)
        assert abs(e - e_ref) <= 1e-5 * max(abs(e), 1.0), (e, e_ref)
        assert np.abs(f - f_ref).max() <= 1e-4 * max(np.abs(f).max(), 1.0)


def test_command_reads_checkpoints_and_exported_models(tmp_path, caplog) -> None:
    # a checkpoint written by mtt train (model version 5), and its export
    checkpoint = tmp_path / "model.ckpt"
    with gzip.open(CHECKPOINTS / "model-v5_trainer-v3.ckpt.gz") as source:
        with open(checkpoint, "wb") as target:
            shutil.copyfileobj(source, target)
    exported = tmp_path / "model.pt"
    from metatrain.utils.io import load_model

    load_model(str(checkpoint)).export().save(str(exported))

    with caplog.at_level(logging.INFO):
        cli.main(["to-mace", str(checkpoint)])
    from_checkpoint = tmp_path / "model.model"
    assert from_checkpoint.is_file() and "wrote" in caplog.text
    cli.main(["to-mace", str(exported), "-o", str(tmp_path / "from-export.model")])

    first = torch.load(from_checkpoint, weights_only=False)
    second = torch.load(tmp_path / "from-export.model", weights_only=False)
    assert first.state_dict().keys() == second.state_dict().keys()
    for key, value in first.state_dict().items():
        assert torch.equal(value, second.state_dict()[key]), key
    import mace

    from metatrain_mace import __version__

    assert first.metatrain_mace_version == __version__
    assert first.mace_torch_version == mace.__version__
    assert first.written_by.startswith(f"metatrain-mace {__version__}")
    molecule = ase.build.molecule("CH3CONH2")
    molecule.rattle(0.05, seed=4)
    periodic = molecule.copy()
    periodic.cell = [6.0, 6.5, 7.0]
    periodic.pbc = True
    _assert_parity(exported, from_checkpoint, None, frames=[molecule, periodic])


def test_refusals_name_the_problem(tmp_path, capsys) -> None:
    only_dipole = _dipole_info([1, 6, 8])
    only_dipole.targets.pop("energy")
    model = MetaMACE(default_model(**ORDINARY), only_dipole)
    with pytest.raises(ValueError, match="no energy predicted by MACE's readouts"):
        to_mace_module(model)

    model = _hypers_built(tmp_path)
    with pytest.raises(ValueError, match=r"choose one of \['energy'\]"):
        to_mace_module(model, "mtt::dipole")

    file = _file(tmp_path)
    for argv, message in [
        (["to-mace", str(tmp_path / "missing.ckpt")], "does not exist"),
        (["to-mace", str(file), "-o", "x.model"], "neither a checkpoint"),
        (["to-mace", str(file)], "-o must differ from PATH"),
    ]:
        with pytest.raises(SystemExit) as error:
            cli.main(argv)
        assert error.value.code == 2
        assert message in capsys.readouterr().err


@pytest.mark.slow
def test_mace_create_lammps_model_converts_the_file(tmp_path) -> None:
    """mace-torch's LAMMPS export runs on the file, and its TorchScript model
    gives the energy and forces of MACE's calculator (LAMMPS itself is not
    needed: the model is called as LAMMPS calls it, every atom local)."""
    import subprocess

    from mace import data
    from mace.tools import torch_geometric, utils

    model = _lora_and_replay_head(tmp_path)
    written = tmp_path / "written.model"
    write_mace_model = to_mace_module(model)
    torch.save(write_mace_model, written)
    subprocess.run(
        [
            str(Path(sys.executable).parent / "mace_create_lammps_model"),
            str(written),
            "--dtype",
            "float64",
        ],
        check=True,
        cwd=tmp_path,
    )
    lammps = torch.jit.load(str(tmp_path / "written.model-lammps.pt"))
    reference = mace_calculator(written, None, "float64")
    atoms = ase.build.bulk("Cu", "fcc", a=3.7, cubic=True) * (2, 2, 2)
    atoms.numbers[::3] = 79
    atoms.rattle(0.05, seed=3)
    z_table = utils.AtomicNumberTable([int(z) for z in write_mace_model.atomic_numbers])
    config = data.config_from_atoms(atoms)
    with backend.float64_default():  # mace-torch's data take the default dtype
        graph = data.AtomicData.from_config(
            config,
            z_table=z_table,
            cutoff=float(write_mace_model.r_max),
            heads=["Default"],
        )
    batch = next(iter(torch_geometric.dataloader.DataLoader([graph], batch_size=1)))
    inputs = batch.to_dict()
    inputs["positions"].requires_grad_(True)
    out = lammps(inputs, torch.ones(len(atoms), dtype=torch.float64))
    e_ref, f_ref, _ = evaluate(reference, atoms)
    assert abs(float(out["total_energy_local"]) - e_ref) <= 1e-10
    assert np.abs(out["forces"].detach().numpy() - f_ref).max() <= 1e-10


def test_write_mace_file_is_atomic_and_complete(tmp_path) -> None:
    model = _hypers_built(tmp_path)
    checkpoint = tmp_path / "model.ckpt"
    torch.save(model.get_checkpoint(), checkpoint)
    output = tmp_path / "sub" / "file.model"
    written = write_mace_file(str(checkpoint), str(output))
    assert output.is_file()
    assert [p.name for p in output.parent.iterdir()] == ["file.model"]
    loaded = torch.load(output, weights_only=False)
    for key, value in written.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key


def _symmetrix_structures() -> list:
    """Structures as symmetrix takes them: molecules need a cell (not periodic)."""
    frames = []
    for atoms in mixed_structures():
        atoms = atoms.copy()
        if not atoms.pbc.any():
            atoms.center(vacuum=6.0)
        frames.append(atoms)
    return frames


@pytest.mark.parametrize("kind", ["hypers-built", "file, LoRA and ZBL"])
def test_symmetrix_reads_the_written_file(tmp_path, kind) -> None:
    """symmetrix-xl (a native MACE engine) on the written file agrees with our
    export within its spline accuracy. It reads MACE models with max_ell 3 and
    correlation 3 only."""
    from symmetrix import Symmetrix

    if kind == "hypers-built":
        hypers = default_model(
            r_max=4.5,
            max_ell=3,
            correlation=3,
            hidden_irreps="8x0e + 8x1o",
            radial_MLP=[16, 16],
        )
        model = MetaMACE(hypers, energy_dataset_info(ELEMENTS))
        model.set_avg_num_neighbors(7.5)
        _baselines(
            model,
            tmp_path,
            atomic_baseline=BASELINE,
            fixed_scaling_weights={"energy": 1.4},
        )
        model = _perturb(model)
    else:
        file = _file(tmp_path, max_ell=3, correlation=3, pair_repulsion=True)
        model = MetaMACE(file_model(file), energy_dataset_info(ELEMENTS))
        apply_finetuning(
            model,
            {"method": "lora", "read_from": "x", "config": {"rank": 2, "alpha": 4.0}},
        )
        _baselines(model, tmp_path, fixed_scaling_weights={"energy": 1.2})
        model = _perturb(model)
    exported = tmp_path / "model.pt"
    model.export().save(str(exported))
    written = tmp_path / "written.model"
    torch.save(to_mace_module(model), written)

    ours = MetatomicCalculator(str(exported), device="cpu")
    # the compiler-free evaluator: same numbers, no model-specific build
    native = Symmetrix(str(written), dtype="float64", streamed_edges="non-compiled")
    for atoms in _symmetrix_structures():
        e, f, s = evaluate(ours, atoms)
        e_native, f_native, s_native = evaluate(native, atoms)
        # measured: 3e-9 to 5e-9 eV, 2e-7 to 9e-7 eV/A, 6e-9 eV/A^3
        assert abs(e - e_native) <= 1e-6 * len(atoms), (e, e_native)
        assert np.abs(f - f_native).max() <= 1e-5
        assert np.abs(s - s_native).max() <= 1e-6
