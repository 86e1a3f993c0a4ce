"""MACE files of mace-torch's dipole classes (``AtomicDipolesMACE``,
``AtomicDielectricMACE``, ``EnergyDipolesMACE``): their dipoles, polarizabilities
and energies as metatrain targets, against MACECalculator and under rotations."""

from pathlib import Path
from typing import Dict

import ase
import numpy as np
import pytest
import torch
from mace.calculators import MACECalculator
from metatomic.torch import ModelOutput
from metatomic_ase import MetatomicCalculator
from metatrain.utils.data import DatasetInfo
from metatrain.utils.data.target_info import get_generic_target_info
from omegaconf import OmegaConf
from scipy.spatial.transform import Rotation

from helpers.datasets import mixed_structures
from helpers.mace_files import DIPOLE_CLASSES, build_dipole_model
from helpers.options import default_model, energy_dataset_info
from metatrain_mace.model import MetaMACE
from metatrain_mace.tools.export import export_mace_model
from metatrain_mace.tools.provenance import rebuild
from metatrain_mace.tools.to_mace import to_mace_module
from metatrain_mace.trunk.response import CALCULATOR_TYPES


OUTPUT_NAMES = {"dipole": "mtt::dipole", "polarizability": "mtt::polarizability"}


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Dict[str, Path]:
    """Each dipole class as a MACE file and exported, made once for the module."""
    folder = tmp_path_factory.mktemp("dipole-classes")
    made = {}
    for kind in DIPOLE_CLASSES:
        path = folder / f"{kind}.model"
        torch.save(build_dipole_model(kind, seed=1), path)
        export_mace_model(str(path), str(folder / f"{kind}.pt"))
        made[kind] = path
    return made


def structures() -> list:
    """A molecule, the same molecule as a charged ion, and a periodic cell."""
    molecule, cell = mixed_structures()
    ion = molecule.copy()
    ion.info["charge"] = 1
    return [molecule, ion, cell]


def ours(calculator: MetatomicCalculator, atoms: ase.Atoms) -> Dict[str, np.ndarray]:
    """Per-structure dipole and polarizability (and energy, forces, stress) of our
    exported model."""
    outputs = calculator._model.capabilities().outputs
    names = [name for name in OUTPUT_NAMES.values() if name in outputs]
    values = calculator.run_model(
        atoms, {name: ModelOutput(sample_kind="system") for name in names}
    )
    result = {
        name.replace("mtt::", ""): values[name].block().values.detach().numpy()
        for name in names
    }
    if "energy" in outputs:
        atoms = atoms.copy()
        atoms.calc = calculator
        result["energy"] = atoms.get_potential_energy()
        result["forces"] = atoms.get_forces()
        if atoms.pbc.all():
            result["stress"] = atoms.get_stress()
    return result


def reference(calculator: MACECalculator, atoms: ase.Atoms) -> Dict[str, np.ndarray]:
    atoms = atoms.copy()
    atoms.calc = calculator
    calculator.calculate(atoms)
    result = {
        key: np.asarray(calculator.results[key])
        for key in ("dipole", "polarizability", "energy", "forces")
        if key in calculator.results
    }
    if "energy" in result and atoms.pbc.all():
        result["stress"] = atoms.get_stress()
    return result


@pytest.mark.parametrize("kind", list(DIPOLE_CLASSES))
def test_exported_file_matches_mace_calculator(files: Dict[str, Path], kind: str):
    """Every output both give, for a molecule, an ion and a periodic cell: within
    1e-10 in float64 (measured: below 1e-15)."""
    path = files[kind]
    mine = MetatomicCalculator(str(path.with_suffix(".pt")), device="cpu")
    theirs = MACECalculator(
        model_paths=str(path),
        model_type=CALCULATOR_TYPES[kind],
        device="cpu",
        default_dtype="float64",
    )
    dipoles = []
    for atoms in structures():
        got, expected = ours(mine, atoms), reference(theirs, atoms)
        compared = set(got) & set(expected)
        assert "dipole" in compared
        assert ("polarizability" in compared) == (kind == "dielectric")
        assert ("energy" in compared) == (kind == "energy_dipole")
        for key in compared:
            np.testing.assert_allclose(
                got[key].reshape(-1), expected[key].reshape(-1), rtol=0, atol=1e-10
            )
            # not trivially zero
            assert np.abs(expected[key]).max() > 1e-5, key
        dipoles.append(got["dipole"].reshape(-1))
    if kind == "dielectric":
        # the ion's charges add up to +1: its dipole differs from the neutral one
        assert np.abs(dipoles[1] - dipoles[0]).max() > 1e-3


@pytest.mark.parametrize("kind", list(DIPOLE_CLASSES))
def test_dipole_and_polarizability_rotate(files: Dict[str, Path], kind: str):
    """Rotated structures: the dipole rotates as R mu, the polarizability as
    R alpha R^T, within 1e-12."""
    mine = MetatomicCalculator(str(files[kind].with_suffix(".pt")), device="cpu")
    rotation = Rotation.random(random_state=3).as_matrix()
    for atoms in mixed_structures():
        rotated = atoms.copy()
        rotated.positions = atoms.positions @ rotation.T
        if atoms.pbc.all():
            rotated.cell = atoms.cell.array @ rotation.T
        before, after = ours(mine, atoms), ours(mine, rotated)
        mu = before["dipole"].reshape(3)
        np.testing.assert_allclose(
            after["dipole"].reshape(3), rotation @ mu, rtol=0, atol=1e-12
        )
        if "polarizability" in before:
            alpha = before["polarizability"].reshape(3, 3)
            np.testing.assert_allclose(
                after["polarizability"].reshape(3, 3),
                rotation @ alpha @ rotation.T,
                rtol=0,
                atol=1e-12,
            )
            np.testing.assert_allclose(alpha, alpha.T, rtol=0, atol=1e-14)


def dipole_info(kind: str = "cartesian", **changes) -> DatasetInfo:
    """A per-structure dipole target, Cartesian or spherical (l = 1)."""
    target = {
        "quantity": "",
        "unit": "",
        "type": {"cartesian": {"rank": 1}}
        if kind == "cartesian"
        else {"spherical": {"irreps": [{"o3_lambda": 1, "o3_sigma": 1}]}},
        "sample_kind": "system",
        "num_subtargets": 1,
        **changes,
    }
    info = get_generic_target_info("mtt::dipole", OmegaConf.create(target))
    return DatasetInfo(
        length_unit="angstrom", atomic_types=[1, 6, 8], targets={"mtt::dipole": info}
    )


def dipole_and_energy_info() -> DatasetInfo:
    """A dipole target and an energy target."""
    energy = energy_dataset_info([1, 6, 8])
    return DatasetInfo(
        length_unit="angstrom",
        atomic_types=[1, 6, 8],
        targets={**dipole_info().targets, **energy.targets},
    )


def eager_dipole(model: MetaMACE, atoms: ase.Atoms) -> torch.Tensor:
    from metatomic.torch import systems_to_torch
    from metatrain.utils.neighbor_lists import get_system_with_neighbor_lists

    system = systems_to_torch(atoms, dtype=torch.float64)
    system = get_system_with_neighbor_lists(system, model.requested_neighbor_lists())
    result = model.eval()([system], {"mtt::dipole": ModelOutput(sample_kind="system")})
    return result["mtt::dipole"].block().values.detach().reshape(-1)


def test_spherical_dipole_target_has_metatensor_order(files: Dict[str, Path]):
    """A dipole target given as a spherical l = 1 block holds (y, z, x), the
    Cartesian one (x, y, z), of the same dipole."""
    molecule = mixed_structures()[0]
    hypers = default_model(mace_model=str(files["dipole"]))
    cartesian = eager_dipole(MetaMACE(hypers, dipole_info("cartesian")), molecule)
    spherical = eager_dipole(MetaMACE(hypers, dipole_info("spherical")), molecule)
    torch.testing.assert_close(spherical, cartesian[[1, 2, 0]], rtol=0, atol=1e-14)


def test_rebuilt_from_the_exported_record(files: Dict[str, Path]):
    """The exported model of a dipole class is rebuilt in Python from its record
    (no pickle), with the same predictions."""
    model = rebuild(str(files["dielectric"].with_suffix(".pt")))
    assert type(model.trunk.mace).__name__ == "AtomicDielectricMACE"
    molecule = mixed_structures()[0]
    mine = MetatomicCalculator(str(files["dielectric"].with_suffix(".pt")))
    expected = ours(mine, molecule)["dipole"].reshape(-1)
    torch.testing.assert_close(
        eager_dipole(model, molecule).numpy(), expected, rtol=0, atol=1e-14
    )


def test_wrong_target_kinds_are_refused(files: Dict[str, Path]):
    hypers = default_model(mace_model=str(files["dielectric"]))
    per_atom = dipole_info(sample_kind="atom")
    with pytest.raises(ValueError, match="'mace_dipole_target' is 'mtt::dipole'.*per"):
        MetaMACE(hypers, per_atom)
    # a dataset with none of the readouts' targets names the hypers
    with pytest.raises(ValueError, match="'mace_dipole_target' is 'mtt::dipole'"):
        MetaMACE(hypers, energy_dataset_info([1, 6, 8]))
    # two outputs, one name
    same = default_model(
        mace_model=str(files["dielectric"]),
        mace_polarizability_target="mtt::dipole",
    )
    with pytest.raises(ValueError, match="give each its own name"):
        MetaMACE(same, dipole_info())
    with pytest.raises(ValueError, match="e3nn only"):
        MetaMACE({**hypers, "enable_cueq": True}, dipole_info())


def test_energy_target_of_a_dipole_file_gets_a_head(files: Dict[str, Path]):
    """AtomicDipolesMACE has no energy readout: an energy target beside the
    dipole gets an MLP head of its own (and to-mace refuses the model)."""
    info = dipole_and_energy_info()
    model = MetaMACE(default_model(mace_model=str(files["dipole"])), info)
    assert "energy" in model.heads
    assert model.mace_head_target == ""
    with pytest.raises(ValueError, match="to-mace writes energy models"):
        to_mace_module(model)
    with pytest.raises(ValueError, match="predict .* together"):
        model.add_readout_head("energy")


def test_lora_on_a_dielectric_file(files: Dict[str, Path], tmp_path: Path):
    """LoRA adapters on the trunk of a dipole class: they start as the identity,
    change the dipole once trained (here: set at random), keep it equivariant, and
    export with it."""
    from metatomic.torch import load_atomistic_model

    from metatrain_mace.finetune import lora
    from metatrain_mace.finetune.strategies import apply_finetuning

    model = MetaMACE(default_model(mace_model=str(files["dielectric"])), dipole_info())
    molecule = mixed_structures()[0]
    before = eager_dipole(model, molecule)
    apply_finetuning(
        model,
        {"method": "lora", "read_from": "x", "config": {"rank": 2, "alpha": 4.0}},
    )
    assert lora.adapters(model)
    torch.testing.assert_close(eager_dipole(model, molecule), before, rtol=0, atol=0)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if ".lora_" in name:
                parameter.copy_(0.5 * torch.randn(parameter.shape, generator=generator))
    adapted = eager_dipole(model, molecule)
    assert (adapted - before).abs().max() > 1e-4
    rotation = Rotation.random(random_state=4).as_matrix()
    rotated = molecule.copy()
    rotated.positions = molecule.positions @ rotation.T
    torch.testing.assert_close(
        eager_dipole(model, rotated).numpy(),
        rotation @ adapted.numpy(),
        rtol=0,
        atol=1e-12,
    )
    model.export().save(str(tmp_path / "lora.pt"))
    load_atomistic_model(str(tmp_path / "lora.pt"))
    exported = ours(MetatomicCalculator(str(tmp_path / "lora.pt")), molecule)
    np.testing.assert_allclose(
        exported["dipole"].reshape(-1), adapted.numpy(), rtol=0, atol=1e-12
    )


def test_precision_report_of_a_dipole_file(files: Dict[str, Path]):
    """The precision report runs the blocks of a dipole class (readouts without
    heads) and reports every block; float32 keeps them to 1e-5 relative."""
    from metatrain_mace.tools.precision import load_for_report, precision_report

    rows = precision_report(
        load_for_report(str(files["dielectric"])), mixed_structures(), ["float32"]
    )
    assert all(row.status == "ok" for row in rows), rows
    blocks = {row.block for row in rows}
    assert {"readout.0", "readout.1"} <= blocks
    assert max(row.max_rel_error for row in rows) < 1e-5


def test_last_layer_features_of_readout_targets(files: Dict[str, Path]):
    """The last-layer features of a target of a dipole class's readouts (asked
    alone, as metatrain's LLPR does) are the scalar node features of all layers."""
    from metatomic.torch import systems_to_torch
    from metatrain.utils.neighbor_lists import get_system_with_neighbor_lists

    info = dipole_and_energy_info()
    model = MetaMACE(default_model(mace_model=str(files["energy_dipole"])), info)
    system = systems_to_torch(mixed_structures()[0], dtype=torch.float64)
    system = get_system_with_neighbor_lists(system, model.requested_neighbor_lists())
    per_atom = ModelOutput(sample_kind="atom")
    for name in (
        "mtt::aux::dipole_last_layer_features",
        "mtt::aux::energy_last_layer_features",
    ):
        alone = model.eval()([system], {name: per_atom})[name].block().values
        features = model.eval()([system], {"feature": per_atom})["feature"]
        scalars = features.block().values
        assert alone.shape == (len(system), model.last_layer_feature_size)
        torch.testing.assert_close(alone[:, : scalars.shape[1]], scalars)
