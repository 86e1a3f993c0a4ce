#!/usr/bin/env python
"""Test-set accuracy of ``mtt train`` (metatrain-mace) against ``mace_run_train``.

The same MACE size, data and number of epochs, trained four ways:

- ``mtt train`` with this package's default training hyperparameters;
- ``mtt train`` with MACE's recipe: MACE's loss weights (energy 1, forces 100),
  EMA of the weights (``ema_decay: 0.99``) and stage two from 75% of the epochs
  (energy weight 1000, forces weight 100, learning rate 1e-3);
- ``mace_run_train`` with its defaults;
- ``mace_run_train --ema --swa`` (its defaults: loss weights 1 and 100, EMA decay
  0.99, stage two from 75% of the epochs with weights 1000 and 100 and learning
  rate 1e-3).

Only the model size, the data, the number of epochs, the batch size, the seed, the
precision (float64) and the device are set for both; everything else is each
program's default. The data are periodic Cu-Au cells of 8 atoms (random
composition, strained, rattled) labelled by ASE's EMT calculator with energies and
forces, split into training, validation and a held-out test set that no run sees.
After training, the parent process evaluates every model on the test set (ours
through metatomic's ASE calculator on the exported ``model.pt``, MACE's through its
``MACECalculator``) and prints the RMSE of the energy per atom and of the forces,
and their ratio to the best ``mace_run_train`` run. Target: our best force RMSE
<= MACE's best.

Run from the repository root::

    python benchmarks/accuracy.py                  # about 40 minutes on 2 cores
    python benchmarks/accuracy.py --epochs 60 --keep

Only packages of the metatrain-mace environment are used; nothing is downloaded.
"""

import argparse
import os
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple


ENERGY_KEY = "REF_energy"
FORCES_KEY = "REF_forces"


def make_data(path: Path, n_structures: int, seed: int) -> None:
    """Strained, rattled fcc Cu-Au cells of 8 atoms with EMT energies and forces."""
    import ase.io
    import numpy as np
    from ase.build import bulk
    from ase.calculators.emt import EMT

    rng = np.random.default_rng(seed)
    frames = []
    for _ in range(n_structures):
        gold = rng.uniform(0.0, 1.0)
        atoms = bulk("Cu", "fcc", a=3.6 + 0.48 * gold, cubic=True).repeat((2, 1, 1))
        atoms.numbers = np.where(rng.uniform(size=len(atoms)) < gold, 79, 29)
        strain = np.eye(3) + rng.uniform(-0.03, 0.03, size=(3, 3))
        atoms.set_cell(atoms.cell[:] @ strain, scale_atoms=True)
        atoms.positions += rng.normal(0.0, 0.08, size=atoms.positions.shape)
        atoms.calc = EMT()
        atoms.info[ENERGY_KEY] = float(atoms.get_potential_energy())
        atoms.arrays[FORCES_KEY] = atoms.get_forces().copy()
        atoms.calc = None
        frames.append(atoms)
    ase.io.write(str(path), frames, format="extxyz")


MODEL = {
    "r_max": 5.0,
    "max_ell": 2,
    "correlation": 2,
    "num_interactions": 2,
    "hidden_irreps": "16x0e + 16x1o",
}


def mace_command(args: argparse.Namespace, root: Path, recipe: bool) -> List[str]:
    options = {
        "--name": "bench",
        "--seed": args.seed,
        "--train_file": root / "train.xyz",
        "--valid_file": root / "valid.xyz",
        "--energy_key": ENERGY_KEY,
        "--forces_key": FORCES_KEY,
        "--E0s": "average",
        "--r_max": MODEL["r_max"],
        "--max_ell": MODEL["max_ell"],
        "--correlation": MODEL["correlation"],
        "--num_interactions": MODEL["num_interactions"],
        "--hidden_irreps": MODEL["hidden_irreps"],
        "--batch_size": args.batch_size,
        "--valid_batch_size": args.batch_size,
        "--max_num_epochs": args.epochs,
        "--default_dtype": "float64",
        "--device": "cpu",
        "--num_workers": 0,
        "--plot": "False",
    }
    command = [
        sys.executable,
        "-c",
        "import sys; from mace.cli.run_train import main; sys.exit(main())",
    ]
    for key, value in options.items():
        command += [key, str(value)]
    if recipe:
        command += ["--ema", "--swa"]
    return command


def metatrain_options(args: argparse.Namespace, root: Path, recipe: bool) -> str:
    def dataset(name: str) -> str:
        return textwrap.indent(
            textwrap.dedent(
                f"""\
                systems:
                  read_from: {root / name}
                  length_unit: angstrom
                targets:
                  energy:
                    key: {ENERGY_KEY}
                    unit: eV
                    forces:
                      key: {FORCES_KEY}"""
            ),
            "  ",
        )

    model = "\n".join(f"    {key}: {value!r}" for key, value in MODEL.items())
    training = ""
    if recipe:
        training = textwrap.indent(
            textwrap.dedent(
                f"""\
                loss:
                  energy:
                    weight: 1.0
                    forces:
                      weight: 100.0
                ema_decay: 0.99
                stage_two_epoch: {int(0.75 * args.epochs)}
                stage_two_loss:
                  energy:
                    weight: 1000.0
                    forces:
                      weight: 100.0
                stage_two_learning_rate: 1.0e-3"""
            ),
            "    ",
        )
    return (
        f"seed: {args.seed}\nbase_precision: 64\ndevice: cpu\n"
        "architecture:\n  name: experimental.mace\n  model:\n"
        f"{model}\n  training:\n    num_epochs: {args.epochs}\n"
        f"    batch_size: {args.batch_size}\n"
        + (f"{training}\n" if training else "")
        + f"training_set:\n{dataset('train.xyz')}\n"
        f"validation_set:\n{dataset('valid.xyz')}\ntest_set: 0.0\n"
    )


def run(command: List[str], workdir: Path, env: Dict[str, str], label: str) -> int:
    start = time.perf_counter()
    with open(workdir / "stdout.log", "w") as log:
        code = subprocess.call(
            command, cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT
        )
    print(f"  {label}: exit {code} after {time.perf_counter() - start:.0f} s")
    return code


def test_errors(calculator, frames) -> Tuple[float, float, float]:
    """RMSE of the energy per atom (meV/atom), RMSE and MAE of the forces (meV/Å)."""
    import numpy as np

    energy_errors = []
    force_errors = []
    for atoms in frames:
        atoms = atoms.copy()
        atoms.calc = calculator
        energy = atoms.get_potential_energy()
        forces = atoms.get_forces()
        energy_errors.append((energy - atoms.info[ENERGY_KEY]) / len(atoms))
        force_errors.append((forces - atoms.arrays[FORCES_KEY]).ravel())
    energy_rmse = float(np.sqrt(np.mean(np.square(energy_errors))))
    force_errors = np.concatenate(force_errors)
    force_rmse = float(np.sqrt(np.mean(np.square(force_errors))))
    force_mae = float(np.mean(np.abs(force_errors)))
    return 1000 * energy_rmse, 1000 * force_rmse, 1000 * force_mae


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--epochs", type=int, default=50)
    parser.add_argument("--train", type=int, default=200, help="training structures")
    parser.add_argument("--valid", type=int, default=50, help="validation structures")
    parser.add_argument("--test", type=int, default=100, help="test structures")
    parser.add_argument("--batch-size", type=int, default=10)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument(
        "--only", choices=["all", "ours", "mace"], default="all", help="what to run"
    )
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    args = parser.parse_args()

    import ase.io

    root = Path(tempfile.mkdtemp(prefix="mace_accuracy_"))
    print(f"working directory: {root}")
    make_data(root / "train.xyz", args.train, seed=args.seed)
    make_data(root / "valid.xyz", args.valid, seed=args.seed + 1)
    make_data(root / "test.xyz", args.test, seed=args.seed + 2)
    print(
        f"data: {args.train} training, {args.valid} validation and {args.test} test "
        "Cu-Au cells of 8 atoms (EMT energies and forces)"
    )
    print(f"model: {MODEL}; {args.epochs} epochs, batch size {args.batch_size}")

    env = dict(os.environ)
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[name] = "1"
    env["CUDA_VISIBLE_DEVICES"] = ""

    runs: List[Tuple[str, str, bool]] = []
    if args.only in ("all", "mace"):
        runs += [("mace", "mace_run_train (defaults)", False)]
        runs += [("mace", "mace_run_train --ema --swa", True)]
    if args.only in ("all", "ours"):
        runs += [("ours", "mtt train (defaults)", False)]
        runs += [("ours", "mtt train (EMA + stage two)", True)]

    jobs: List[Tuple[str, str, Path, List[str]]] = []
    for index, (program, label, recipe) in enumerate(runs):
        workdir = root / f"run{index}"
        workdir.mkdir()
        if program == "mace":
            command = mace_command(args, root, recipe)
        else:
            (workdir / "options.yaml").write_text(metatrain_options(args, root, recipe))
            command = [
                sys.executable,
                "-c",
                "import sys; from metatrain.__main__ import main; sys.exit(main())",
                "train",
                "options.yaml",
                "-o",
                "model.pt",
            ]
        jobs.append((program, label, workdir, command))

    # two runs at a time, one thread each: the 2-core machine is used fully
    codes: Dict[str, int] = {}
    pending = list(jobs)
    while pending:
        batch, pending = pending[:2], pending[2:]
        threads = []
        for _program, label, workdir, command in batch:

            def target(label=label, workdir=workdir, command=command) -> None:
                codes[label] = run(command, workdir, env, label)

            threads.append(threading.Thread(target=target))
            threads[-1].start()
        for thread in threads:
            thread.join()

    test_frames = ase.io.read(str(root / "test.xyz"), ":")
    results: Dict[str, Optional[Tuple[float, float, float]]] = {}
    for program, label, workdir, _ in jobs:
        if codes[label] != 0:
            print(f"{label} failed; see {workdir / 'stdout.log'}")
            results[label] = None
            continue
        if program == "mace":
            from mace.calculators import MACECalculator

            stage_two = workdir / "bench_stagetwo.model"
            path = stage_two if stage_two.exists() else workdir / "bench.model"
            calculator = MACECalculator(
                model_paths=str(path), device="cpu", default_dtype="float64"
            )
        else:
            from metatomic_ase import MetatomicCalculator

            calculator = MetatomicCalculator(str(workdir / "model.pt"))
        results[label] = test_errors(calculator, test_frames)

    mace_best = min(
        (r for label, r in results.items() if r and label.startswith("mace")),
        key=lambda r: r[1],
        default=None,
    )
    print()
    print(
        f"{'run':<30} {'E RMSE (meV/atom)':>18} {'F RMSE (meV/Å)':>15} "
        f"{'F MAE (meV/Å)':>14} {'E / MACE best':>14} {'F / MACE best':>14}"
    )
    for label, result in results.items():
        if result is None:
            print(f"{label:<30} {'failed':>18}")
            continue
        ratios = ("-", "-")
        if mace_best is not None:
            ratios = (
                f"{result[0] / mace_best[0]:.2f}",
                f"{result[1] / mace_best[1]:.2f}",
            )
        print(
            f"{label:<30} {result[0]:>18.2f} {result[1]:>15.2f} {result[2]:>14.2f} "
            f"{ratios[0]:>14} {ratios[1]:>14}"
        )
    ours = [r for label, r in results.items() if r and label.startswith("mtt")]
    if ours and mace_best is not None:
        best = min(r[1] for r in ours)
        verdict = "met" if best <= mace_best[1] else "NOT met"
        print(
            f"\nour best force RMSE / MACE's best = {best / mace_best[1]:.2f} "
            f"(target <= 1.0 {verdict})"
        )
    if not args.keep:
        import shutil

        shutil.rmtree(root)
    return 0 if all(code == 0 for code in codes.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
