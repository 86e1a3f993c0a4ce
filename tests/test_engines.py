"""Engines beyond ASE run a trained, exported model: i-PI and TorchSim.

- i-PI: the ``i-pi`` server and its metatomic driver (``i-pi-py_driver -m
  metatomic``) talk over a UNIX socket; a short NVE run must conserve energy.
- TorchSim needs Python >= 3.12 and its own torch, so it runs in a separate
  environment (``.venv-torchsim``, made from ``tests/engines/torchsim-requirements.txt``
  by this test if missing; ``tox -e torchsim`` uses the same file) on a script,
  ``tests/engines/torchsim_md.py``: batched energies, forces and stresses equal
  metatomic's ASE calculator, and batched NVE of several systems conserves energy.
"""

import json
import subprocess
import sys
import time
import uuid
from pathlib import Path

import ase.io
import numpy as np
import pytest
from omegaconf import OmegaConf

from engines.torchsim_env import torchsim_python
from helpers.options import train_options


# whole training runs
pytestmark = pytest.mark.slow


ENGINES = Path(__file__).parent / "engines"


@pytest.fixture(scope="module")
def trained(tmp_path_factory, alloy_path) -> Path:
    """A model trained for 3 epochs on the Cu-Au data, exported to ``model.pt``."""
    from metatrain.cli.train import train_model

    directory = tmp_path_factory.mktemp("engines")
    model = {
        "r_max": 4.5,
        "hidden_irreps": "8x0e + 8x1o",
        "num_interactions": 2,
        "correlation": 2,
        "max_ell": 2,
    }
    options = train_options(
        alloy_path, model, validation=0.2, num_epochs=3, batch_size=4
    )
    (directory / "run").mkdir()
    train_model(
        OmegaConf.create(options),
        output=str(directory / "model.pt"),
        checkpoint_dir=str(directory / "run"),
    )
    frames = ase.io.read(alloy_path, ":3")
    ase.io.write(directory / "structures.xyz", frames)
    return directory


def _energy_drift(totals: np.ndarray, n_atoms: int) -> float:
    """Largest deviation of the total energy from its start, per atom (eV)."""
    return float(np.abs(totals - totals[0]).max() / n_atoms)


I_PI_INPUT = """<simulation verbosity='low' safe_stride='1000'>
  <output prefix='md'>
    <properties stride='1' filename='out'>
      [ step, conserved{{electronvolt}}, potential{{electronvolt}},
        kinetic_md{{electronvolt}} ]
    </properties>
  </output>
  <total_steps>{steps}</total_steps>
  <prng><seed>12345</seed></prng>
  <ffsocket name='mace' mode='unix' pbc='true'>
    <address>{address}</address>
  </ffsocket>
  <system>
    <initialize nbeads='1'>
      <file mode='ase'>start.xyz</file>
      <velocities mode='thermal' units='kelvin'>300</velocities>
    </initialize>
    <forces><force forcefield='mace'/></forces>
    <ensemble><temperature units='kelvin'>300</temperature></ensemble>
    <motion mode='dynamics'>
      <dynamics mode='nve'><timestep units='femtosecond'>1.0</timestep></dynamics>
    </motion>
  </system>
</simulation>
"""


def test_ipi_nve_conserves_energy(trained: Path, tmp_path: Path) -> None:
    """200 steps of NVE at 1 fs through i-PI's metatomic driver: the conserved
    quantity stays within 1 meV/atom while the potential energy moves far more."""
    atoms = ase.io.read(trained / "structures.xyz", 0).repeat((2, 1, 1))
    ase.io.write(tmp_path / "start.xyz", atoms)
    address = f"mtt-mace-{uuid.uuid4().hex[:8]}"
    steps = 200
    (tmp_path / "input.xml").write_text(I_PI_INPUT.format(steps=steps, address=address))
    bin_dir = Path(sys.executable).parent
    server = subprocess.Popen(
        [str(bin_dir / "i-pi"), "input.xml"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    driver = None
    try:
        socket = Path(f"/tmp/ipi_{address}")
        deadline = time.monotonic() + 60
        while not socket.exists():
            assert server.poll() is None, server.communicate()[0]
            assert time.monotonic() < deadline, "i-PI did not open its socket"
            time.sleep(0.2)
        driver = subprocess.Popen(
            [
                str(bin_dir / "i-pi-py_driver"),
                "-u",
                "-a",
                address,
                "-m",
                "metatomic",
                "-o",
                f"template=start.xyz,model={trained / 'model.pt'}",
            ],
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        output, _ = server.communicate(timeout=300)
        assert server.returncode == 0, output
    finally:
        for process in (server, driver):
            if process is not None and process.poll() is None:
                process.kill()
    data = np.loadtxt(tmp_path / "md.out")
    assert data.shape[0] >= steps
    conserved, potential = data[:, 1], data[:, 2]
    drift = _energy_drift(conserved, len(atoms))
    swing = float(np.ptp(potential)) / len(atoms)
    print(f"i-PI NVE: conserved drift {drift:.2e} eV/atom, potential swing {swing:.2e}")
    assert swing > 5e-3
    assert drift < 1e-3


def test_torchsim_batched_md(trained: Path, tmp_path: Path) -> None:
    """Three systems in one TorchSim state: energies, forces and stresses equal the
    ASE calculator's; 200 steps of batched NVE conserve every system's energy."""
    output = tmp_path / "torchsim.json"
    run = subprocess.run(
        [
            str(torchsim_python()),
            str(ENGINES / "torchsim_md.py"),
            str(trained / "model.pt"),
            str(trained / "structures.xyz"),
            str(output),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    result = json.loads(output.read_text())
    frames = ase.io.read(trained / "structures.xyz", ":")
    print({k: v for k, v in result.items() if k != "total_energies"})
    assert result["n_systems"] == len(frames) == 3
    assert result["forces_scale"] > 1e-2
    assert result["energy_error"] < 1e-8
    assert result["forces_error"] < 1e-8
    assert result["stress_error"] < 1e-8
    totals = np.array(result["total_energies"])
    for system, atoms in enumerate(frames):
        drift = _energy_drift(totals[:, system], len(atoms))
        print(f"TorchSim NVE system {system}: drift {drift:.2e} eV/atom")
        assert drift < 1e-3
