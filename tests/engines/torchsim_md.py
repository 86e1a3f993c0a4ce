"""Run by tests/test_engines.py with the Python 3.12 environment of TorchSim
(tests/engines/torchsim-requirements.txt), not by pytest.

Usage: python torchsim_md.py MODEL.pt STRUCTURES.xyz OUTPUT.json

Evaluates all structures at once (one batched TorchSim state) and one by one with
metatomic's ASE calculator, then runs batched NVE (velocity Verlet) for all of them,
and writes the largest differences and the total energy of every step to OUTPUT.
"""

import json
import sys

import ase.io
import numpy as np
import torch
import torch_sim as ts
from metatomic_ase import MetatomicCalculator
from metatomic_torchsim import MetatomicModel
from torch_sim.integrators.nve import nve_init, nve_step
from torch_sim.quantities import calc_kinetic_energy


def main(model_path: str, structures_path: str, output_path: str) -> None:
    torch.manual_seed(0)
    frames = ase.io.read(structures_path, ":")
    model = MetatomicModel(model_path, device="cpu", compute_stress=True)
    state = ts.initialize_state(frames, device=torch.device("cpu"), dtype=torch.float64)
    batched = model(state)

    calculator = MetatomicCalculator(model_path, device="cpu")
    energies, forces, stresses = [], [], []
    for atoms in frames:
        atoms.calc = calculator
        energies.append(atoms.get_potential_energy())
        forces.append(atoms.get_forces())
        stresses.append(atoms.get_stress(voigt=False))
    result = {
        "n_systems": len(frames),
        "energy_error": float(
            np.abs(batched["energy"].detach().numpy() - np.array(energies)).max()
        ),
        "forces_error": float(
            np.abs(batched["forces"].detach().numpy() - np.concatenate(forces)).max()
        ),
        "stress_error": float(
            np.abs(batched["stress"].detach().numpy() - np.array(stresses)).max()
        ),
        "forces_scale": float(np.abs(np.concatenate(forces)).max()),
    }

    # NVE at 1 fs for every system at once; torch-sim works in eV, Å, amu
    kT = torch.tensor(300.0 * ts.units.MetalUnits.temperature, dtype=torch.float64)
    md_state = nve_init(state, model, kT=kT)
    # 1 fs (MetalUnits.time converts picoseconds)
    dt = torch.tensor(0.001 * ts.units.MetalUnits.time, dtype=torch.float64)
    totals = []
    for _ in range(200):
        md_state = nve_step(md_state, model, dt=dt)
        kinetic = calc_kinetic_energy(
            masses=md_state.masses,
            momenta=md_state.momenta,
            system_idx=md_state.system_idx,
        )
        totals.append((md_state.energy + kinetic).detach().tolist())
    result["total_energies"] = totals
    with open(output_path, "w") as file:
        json.dump(result, file)


if __name__ == "__main__":
    main(*sys.argv[1:4])
