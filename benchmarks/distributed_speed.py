"""Epoch time of ``mtt train`` on 1 and 2 processes, measured side by side.

Makes an EMT-labelled set of 32-atom Cu-Au cells, then trains the same model with
the same options (energies, forces, stresses; float64) in turn:

- 1 process, 1 thread, batch B;
- 1 process, as many threads as processes below, batch B (the same cores as the
  distributed run, used by intra-op threads instead);
- N processes with ``torchrun`` (gloo on CPU, NCCL with ``--device cuda``), one
  thread each, batch B / N per process (the same global batch, so the same
  number of optimizer steps per epoch).

The epoch time is the time between the first and the last "Epoch:" line of each
run's ``train.log`` divided by the number of epochs in between (so the first epoch,
which warms up, is left out); the table gives the median over the repeats, which
alternate the configurations.

    python benchmarks/distributed_speed.py [--processes 2] [--structures 128]
        [--epochs 8] [--batch-size 8] [--repeats 2] [--device cpu]
"""

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from datetime import datetime
from pathlib import Path
from typing import Dict, List

import ase.io
import numpy as np
import yaml
from ase.build import bulk
from ase.calculators.emt import EMT


def make_data(path: Path, n_structures: int) -> None:
    rng = np.random.default_rng(0)
    frames = []
    for _ in range(n_structures):
        atoms = bulk("Cu", "fcc", a=3.7, cubic=True).repeat((2, 2, 2))
        atoms.numbers[rng.random(len(atoms)) < 0.5] = 79
        atoms.positions += rng.normal(scale=0.1, size=atoms.positions.shape)
        atoms.calc = EMT()
        atoms.info["REF_energy"] = atoms.get_potential_energy()
        atoms.info["REF_stress"] = atoms.get_stress(voigt=False)
        atoms.arrays["REF_forces"] = atoms.get_forces()
        atoms.calc = None
        frames.append(atoms)
    ase.io.write(path, frames, format="extxyz")


def options(epochs: int, batch_size: int, device: str) -> Dict:
    return {
        "seed": 0,
        "base_precision": 64,
        "device": device,
        "architecture": {
            "name": "experimental.mace",
            "model": {
                "r_max": 5.0,
                "hidden_irreps": "32x0e + 32x1o",
                "max_ell": 2,
                "correlation": 3,
                "num_interactions": 2,
            },
            "training": {
                "num_epochs": epochs,
                "batch_size": batch_size,
                "num_workers": 0,
                "checkpoint_interval": 1000,
                "log_interval": 1,
            },
        },
        "training_set": {
            "systems": {"read_from": "data.xyz", "length_unit": "angstrom"},
            "targets": {
                "energy": {
                    "key": "REF_energy",
                    "unit": "eV",
                    "forces": {"key": "REF_forces"},
                    "stress": {"key": "REF_stress"},
                }
            },
        },
        "validation_set": 0.1,
        "test_set": 0.0,
    }


def epoch_time(log: Path) -> float:
    """Seconds per epoch from the second "Epoch:" line to the last (the log's time
    stamps have a resolution of one second: spread over all epochs)."""
    stamps = [
        datetime.strptime(line[1:20], "%Y-%m-%d %H:%M:%S")
        for line in log.read_text().splitlines()
        if "] - Epoch:" in line
    ]
    return (stamps[-1] - stamps[0]).total_seconds() / (len(stamps) - 1)


def run(workdir: Path, processes: int, threads: int, batch_size: int, args) -> float:
    directory = workdir / f"run-{processes}p-{threads}t-{len(list(workdir.iterdir()))}"
    directory.mkdir()
    shutil.copy(workdir / "data.xyz", directory / "data.xyz")
    (directory / "options.yaml").write_text(
        yaml.safe_dump(options(args.epochs, batch_size, args.device))
    )
    mtt = str(Path(sys.executable).parent / "mtt")
    command = [mtt, "train", "options.yaml"]
    if processes > 1:
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            str(processes),
            *command,
        ]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    result = subprocess.run(
        command, cwd=directory, env=env, capture_output=True, text=True
    )
    if result.returncode != 0:
        raise RuntimeError(result.stdout[-3000:] + result.stderr[-3000:])
    (log,) = directory.glob("outputs/*/*/train.log")
    return epoch_time(log)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--structures", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    n = args.processes
    if args.batch_size % n != 0:
        parser.error("--batch-size must be a multiple of --processes")

    configurations = [
        ("1 process, 1 thread", 1, 1, args.batch_size),
        (f"1 process, {n} threads", 1, n, args.batch_size),
        (f"{n} processes, 1 thread each", n, 1, args.batch_size // n),
    ]
    if args.device != "cpu":
        configurations = [configurations[0], configurations[2]]
    times: Dict[str, List[float]] = {name: [] for name, *_ in configurations}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        make_data(workdir / "data.xyz", args.structures)
        for repeat in range(args.repeats):
            for name, processes, threads, batch in configurations:
                seconds = run(workdir, processes, threads, batch, args)
                times[name].append(seconds)
                print(f"repeat {repeat}: {name}: {seconds:.2f} s/epoch", flush=True)

    reference = statistics.median(times[configurations[0][0]])
    print(
        f"\n{args.structures} structures of 32 atoms, global batch "
        f"{args.batch_size}, device {args.device}"
    )
    print(f"{'configuration':32s} {'epoch (s)':>10s} {'speed-up':>9s}")
    for name, *_ in configurations:
        median = statistics.median(times[name])
        print(f"{name:32s} {median:10.2f} {reference / median:9.2f}")


if __name__ == "__main__":
    main()
