"""Predictions on new structures: ``mtt eval model.pt eval.yaml`` where ``eval.yaml``
gives only ``systems`` writes energies, forces and stress, and every other output
of the model (outputs of several blocks one block a column)."""

import os
import subprocess
import sys
from pathlib import Path

import ase.build
import ase.io
import numpy as np
import pytest
import torch
from mace.calculators import MACECalculator
from metatensor.torch import Labels, TensorBlock, TensorMap
from metatomic.torch import systems_to_torch

from helpers.cli import mtt
from helpers.mace_files import save_mace_model
from metatrain_mace.tools.predictions import single_blocks


def structures() -> list:
    rng = np.random.default_rng(5)
    crystal = ase.build.bulk("Cu", "fcc", a=3.6, cubic=True).repeat(2)
    crystal.symbols[:5] = "Au"
    crystal.positions += rng.normal(scale=0.05, size=crystal.positions.shape)
    molecule = ase.build.molecule("CH3OH")
    molecule.positions += rng.normal(scale=0.05, size=molecule.positions.shape)
    return [crystal, molecule]


@pytest.mark.slow
def test_zero_epoch_export_predicts_like_mace(tmp_path: Path) -> None:
    """A MACE file exported as it is: mtt eval without references gives MACE's own
    energies, forces and stress (NaN stress for the molecule) and the features."""
    save_mace_model(tmp_path / "file.model", seed=11)
    result = subprocess.run(
        [str(Path(sys.executable).parent / "metatrain-mace"), "export"]
        + ["file.model", "-o", "model.pt"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={**os.environ},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    ase.io.write(tmp_path / "new.xyz", structures(), format="extxyz")
    (tmp_path / "predict.yaml").write_text("systems:\n  read_from: new.xyz\n")
    result = mtt("eval", "model.pt", "predict.yaml", "-o", "out.xyz", cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    predicted = ase.io.read(tmp_path / "out.xyz", ":")
    reference = MACECalculator(
        model_paths=str(tmp_path / "file.model"), device="cpu", default_dtype="float64"
    )
    for atoms, expected in zip(predicted, structures(), strict=True):
        expected.calc = reference
        assert atoms.get_potential_energy() == pytest.approx(
            expected.get_potential_energy(), abs=1e-10
        )
        # per-atom arrays of an xyz file hold 8 decimals
        np.testing.assert_allclose(
            atoms.get_forces(), expected.get_forces(), atol=1e-8, rtol=0
        )
        assert np.abs(atoms.get_forces()).max() > 1e-3
        stress = atoms.calc.results["stress"]
        if expected.pbc.any():
            np.testing.assert_allclose(
                stress, expected.get_stress(), atol=1e-10, rtol=0
            )
        else:
            assert np.isnan(stress).all()
        # the equivariant features, one column group per irrep, and the invariant
        assert atoms.arrays["mtt_aux_mace_features_o3_lambda_0_o3_sigma_1"].shape[
            0
        ] == (len(atoms))
        assert (
            atoms.arrays["mtt_aux_mace_features_o3_lambda_1_o3_sigma_1"].shape[1] % 3
            == 0
        )
        assert "feature" in atoms.arrays


def test_blocks_of_some_atoms_get_a_row_per_atom() -> None:
    """An atomic-basis-like output (one block per atomic type) is written one block
    a column, NaN for the atoms a block does not hold."""
    systems = systems_to_torch(structures(), dtype=torch.float64)
    types = torch.cat([system.types for system in systems])
    rows = torch.cat(
        [
            torch.stack([torch.full((len(s),), i), torch.arange(len(s))], dim=1)
            for i, s in enumerate(systems)
        ]
    ).to(torch.int32)
    blocks = []
    for atomic_type in (6, 29):
        mask = types == atomic_type
        blocks.append(
            TensorBlock(
                values=torch.arange(int(mask.sum()) * 2, dtype=torch.float64).reshape(
                    -1, 2
                ),
                samples=Labels(["system", "atom"], rows[mask]),
                components=[],
                properties=Labels.range("p", 2),
            )
        )
    carbon_values = blocks[0].values.clone()
    tensor = TensorMap(Labels(["atom_type"], torch.tensor([[6], [29]])), blocks)
    energy = TensorMap(
        Labels.single(),
        [
            TensorBlock(
                torch.zeros(2, 1, dtype=torch.float64),
                Labels(["system"], torch.tensor([[0], [1]])),
                [],
                Labels.range("energy", 1),
            )
        ],
    )
    result = single_blocks(systems, {"mtt::basis": tensor, "energy": energy})
    assert set(result) == {"mtt_basis_atom_type_6", "mtt_basis_atom_type_29", "energy"}
    carbon = result["mtt_basis_atom_type_6"].block().values
    assert carbon.shape == (len(types), 2)
    assert torch.isnan(carbon[types != 6]).all()
    torch.testing.assert_close(carbon[types == 6], carbon_values)
    assert result["energy"] is energy
