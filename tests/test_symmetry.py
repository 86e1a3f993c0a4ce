"""Exported-model outputs of every target kind transform as their irreps say.

Random rotations, rotations combined with the inversion, and the inversion itself are
applied to a molecule and to a periodic triclinic cell (positions and cell together);
the outputs of the saved (TorchScript) model, evaluated through metatomic's ASE tools,
must equal the rotated reference outputs: Wigner matrices for spherical blocks and for
``mtt::aux::mace_features``, the matrix itself for Cartesian vectors, invariance for
scalars, features and last-layer features; forces and stresses rotate as vectors and
rank-2 tensors. Translations leave everything unchanged, atom permutations permute
the per-atom outputs.
"""

from typing import Dict

import numpy as np
import pytest
import torch
from metatomic.torch import (
    ModelEvaluationOptions,
    ModelOutput,
    System,
    load_atomistic_model,
    systems_to_torch,
)
from metatomic_ase import MetatomicCalculator
from metatrain.utils.neighbor_lists import get_system_with_neighbor_lists

from helpers.options import default_model
from helpers.symmetry import (
    HYPERS,
    all_kinds_dataset_info,
    as_3d,
    evaluate,
    expected_transform,
    o3_matrices,
    structures,
    transformed,
    wigner,
)
from metatrain_mace import MetaMACE
from metatrain_mace.mace_import import o3


TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-4}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Many tiny evaluations: one thread is 10-50x faster on a loaded 2-core box."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def output_kinds(model: MetaMACE) -> Dict[str, tuple]:
    """How each output transforms ("scalar", "cartesian" or "spherical"), and the
    sample kind to request it with (``None``: both per atom and per structure)."""
    kinds = {
        "feature": ("scalar", None),
        "mtt::aux::mace_features": ("spherical", None),
    }
    # every target is also asked with the other sample kind: per-structure targets
    # per atom, per-atom targets summed per structure
    for name, info in model.dataset_info.targets.items():
        if info.is_cartesian:
            kinds[name] = ("cartesian", None)
        elif info.is_spherical:
            kinds[name] = ("spherical", None)
        else:
            kinds[name] = ("scalar", None)
    for name in model.supported_outputs():
        if name.endswith("_last_layer_features"):
            kinds[name] = ("scalar", None)
    assert set(kinds) == set(model.supported_outputs())
    return kinds


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Dict[torch.dtype, tuple]:
    """The same untrained model, saved in float64 and float32.

    Built under torch's default dtype (float32), as ``mtt train`` does: the model
    must keep float64-accurate coefficients by itself.
    """
    assert torch.get_default_dtype() == torch.float32
    torch.manual_seed(0)
    hypers = default_model(**HYPERS)
    model = MetaMACE(hypers, all_kinds_dataset_info())
    kinds = output_kinds(model)
    directory = tmp_path_factory.mktemp("exported")
    result = {}
    for dtype in (torch.float64, torch.float32):
        path = str(directory / f"model-{str(dtype)[6:]}.pt")
        model.to(dtype).export().save(path)
        result[dtype] = (path, kinds)
    return result


def test_metatomic_wigner_is_e3nn_wigner_in_yzx_order() -> None:
    """The reference Wigner matrices (metatensor convention) agree with e3nn's.

    e3nn's real spherical harmonics take the polar axis along y; evaluated on
    (y, z, x) they follow metatensor's convention, so D_metatensor(R) = D_e3nn(P R P^T),
    and both agree on the sign a block picks up under inversion.
    """
    permutation = torch.tensor([[0, 1, 0], [0, 0, 1], [1, 0, 0]], dtype=torch.float64)
    for matrix in o3_matrices(1):
        for o3_lambda in range(4):
            for o3_sigma in (1, -1):
                # e3nn's parity of a block: o3_sigma * (-1)^l
                irrep = o3.Irrep(o3_lambda, o3_sigma * (-1) ** o3_lambda)
                e3nn_D = irrep.D_from_matrix(permutation @ matrix @ permutation.T)
                D = wigner(matrix, o3_lambda, o3_sigma)
                assert torch.allclose(D, e3nn_D, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_outputs_transform_under_o3(exported, dtype) -> None:
    path, kinds = exported[dtype]
    calculator = MetatomicCalculator(path, extensions_directory=None)
    errors: Dict[str, float] = {}
    scales: Dict[str, float] = {}
    block_scales: Dict[str, float] = {}
    for atoms in structures():
        for sample_kind in ("system", "atom"):
            reference = evaluate(calculator, atoms, kinds, sample_kind)
            for matrix in o3_matrices(2):
                new = evaluate(
                    calculator, transformed(atoms, matrix.numpy()), kinds, sample_kind
                )
                for name, blocks in reference.items():
                    for (key, values), (_, new_values) in zip(
                        blocks, new[name], strict=True
                    ):
                        expected = expected_transform(
                            as_3d(values), key, kinds[name][0], matrix
                        )
                        error = float((as_3d(new_values) - expected).abs().max())
                        label = f"{name} ({kinds[name][1] or sample_kind})"
                        errors[label] = max(errors.get(label, 0.0), error)
                        # the smallest block of each output sets its scale
                        block = f"{label} {key}"
                        scale = float(values.abs().max())
                        block_scales[block] = max(block_scales.get(block, 0.0), scale)
                        scales[label] = min(
                            block_scales[b] for b in block_scales if b.startswith(label)
                        )
    for label in sorted(errors):
        print(
            f"{dtype} {label}: max error {errors[label]:.2e} "
            f"(smallest block scale {scales[label]:.2e})"
        )
    # every block of every output is non-trivial: the test compares real numbers
    assert min(scales.values()) > 1e-3, scales
    assert max(errors.values()) <= TOLERANCE[dtype], errors


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_forces_and_stress_transform_under_o3(exported, dtype) -> None:
    path, _ = exported[dtype]
    calculator = MetatomicCalculator(path, extensions_directory=None)
    worst = {"energy": 0.0, "forces": 0.0, "stress": 0.0}
    for atoms in structures():
        atoms.calc = calculator
        energy = atoms.get_potential_energy()
        forces = atoms.get_forces()
        stress = atoms.get_stress(voigt=False) if atoms.pbc.any() else None
        for matrix in o3_matrices(3):
            Q = matrix.numpy()
            new = transformed(atoms, Q)
            new.calc = calculator
            worst["energy"] = max(
                worst["energy"], abs(new.get_potential_energy() - energy)
            )
            error = np.abs(new.get_forces() - forces @ Q.T).max()
            worst["forces"] = max(worst["forces"], error)
            if stress is not None:
                error = np.abs(new.get_stress(voigt=False) - Q @ stress @ Q.T).max()
                worst["stress"] = max(worst["stress"], error)
        assert np.abs(forces).max() > 1e-3
    print(f"{dtype} energy/forces/stress max errors: {worst}")
    assert max(worst.values()) <= TOLERANCE[dtype], worst


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_translations_and_permutations(exported, dtype) -> None:
    path, kinds = exported[dtype]
    calculator = MetatomicCalculator(path, extensions_directory=None)
    rng = np.random.default_rng(4)
    worst = 0.0
    for atoms in structures():
        for sample_kind in ("system", "atom"):
            reference = evaluate(calculator, atoms, kinds, sample_kind)
            shifted = atoms.copy()
            shifted.positions += rng.normal(scale=3.0, size=3)
            permutation = rng.permutation(len(atoms))
            permuted = atoms[permutation]
            for new_atoms, order in ((shifted, None), (permuted, permutation)):
                new = evaluate(calculator, new_atoms, kinds, sample_kind)
                for name, blocks in reference.items():
                    for (_, values), (_, new_values) in zip(
                        blocks, new[name], strict=True
                    ):
                        expected = values
                        per_atom = "atom" in (kinds[name][1] or sample_kind)
                        if per_atom and order is not None:
                            expected = values[torch.from_numpy(order)]
                        worst = max(worst, float((new_values - expected).abs().max()))
    print(f"{dtype} translations/permutations max error {worst:.2e}")
    assert worst <= TOLERANCE[dtype]


def autograd_forces_and_stress(model, atoms, dtype, name: str) -> tuple:
    """Forces and stress of the energy-like output ``name``, by autograd."""
    system = systems_to_torch(atoms, dtype=dtype, positions_requires_grad=True)
    strain = torch.eye(3, dtype=dtype, requires_grad=True)
    system = System(
        types=system.types,
        positions=system.positions @ strain,
        cell=system.cell @ strain,
        pbc=system.pbc,
    )
    system = get_system_with_neighbor_lists(system, model.requested_neighbor_lists())
    options = ModelEvaluationOptions(
        length_unit="angstrom", outputs={name: ModelOutput(sample_kind="system")}
    )
    energy = model([system], options, check_consistency=True)[name].block().values
    positions = system.positions
    forces, virial = torch.autograd.grad(energy.sum(), [positions, strain])
    volume = abs(np.linalg.det(np.asarray(atoms.cell))) if atoms.pbc.any() else 1.0
    return -forces.to(torch.float64).numpy(), virial.to(torch.float64).numpy() / volume


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_second_energy_forces_and_stress_transform_under_o3(exported, dtype) -> None:
    """An energy-like target on an MLP head: autograd forces and stress rotate too."""
    path, _ = exported[dtype]
    model = load_atomistic_model(path)
    worst = {"forces": 0.0, "stress": 0.0}
    for atoms in structures():
        forces, stress = autograd_forces_and_stress(model, atoms, dtype, "mtt::energy2")
        assert np.abs(forces).max() > 1e-3
        for matrix in o3_matrices(5):
            Q = matrix.numpy()
            new_forces, new_stress = autograd_forces_and_stress(
                model, transformed(atoms, Q), dtype, "mtt::energy2"
            )
            worst["forces"] = max(
                worst["forces"], np.abs(new_forces - forces @ Q.T).max()
            )
            if atoms.pbc.any():
                error = np.abs(new_stress - Q @ stress @ Q.T).max()
                worst["stress"] = max(worst["stress"], error)
    print(f"{dtype} mtt::energy2 forces/stress max errors: {worst}")
    assert max(worst.values()) <= TOLERANCE[dtype], worst


def test_per_atom_targets_summed_per_structure(exported) -> None:
    """A per-atom target asked per structure is the sum of its per-atom values."""
    path, kinds = exported[torch.float64]
    calculator = MetatomicCalculator(path, extensions_directory=None)
    names = ["mtt::atom_scalars", "mtt::displacement", "mtt::spherical"]
    for atoms in structures():
        per_atom = calculator.run_model(
            atoms, {name: ModelOutput(sample_kind="atom") for name in names}
        )
        per_structure = calculator.run_model(
            atoms, {name: ModelOutput(sample_kind="system") for name in names}
        )
        for name in names:
            for key, block in per_structure[name].items():
                expected = per_atom[name].block(key).values.sum(dim=0, keepdim=True)
                assert block.samples.names == ["system"]
                assert torch.allclose(block.values, expected, atol=1e-12), name
