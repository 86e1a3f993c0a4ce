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
program's default (for the periodic sets, ``mace_run_train`` gets ``--loss stress``,
its way to fit stresses, and ours a stress target).

The data sets (``--sets``), labelled by reference calculators that come with ASE,
split into training, validation and a held-out test set that no run sees:

- ``alloy``: periodic Cu-Au cells of 8 atoms (random composition, strained,
  rattled), EMT energies, forces and stresses;
- ``molecules``: small C/H/N/O molecules of ASE's g2 set, rattled, EMT energies and
  forces (not periodic);
- ``silicon``: periodic diamond Si cells of 8 atoms (strained, rattled, some with a
  vacancy), Tersoff energies, forces and stresses.

After training, the parent process evaluates every model on the test set (ours
through metatomic's ASE calculator on the exported ``model.pt``, MACE's through its
``MACECalculator``) and prints the RMSE of the energy per atom, of the forces (and
of the stress), and their ratio to the best ``mace_run_train`` run, for every set
and seed. Target (issue "accuracy by default"): our defaults' force RMSE <= 0.9x
MACE's best, energy never worse.

Run from the repository root::

    python benchmarks/accuracy.py                      # alloy, about 40 minutes
    python benchmarks/accuracy.py --sets alloy,molecules,silicon --seeds 7,8
    python benchmarks/accuracy.py --epochs 2 --train 8 --valid 4 --test 4  # smoke

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
STRESS_KEY = "REF_stress"


def _label(atoms, calculator, periodic: bool) -> None:
    """Store the calculator's energy, forces (and stress) under the REF_ keys."""
    atoms.calc = calculator
    atoms.info[ENERGY_KEY] = float(atoms.get_potential_energy())
    atoms.arrays[FORCES_KEY] = atoms.get_forces().copy()
    if periodic:
        atoms.info[STRESS_KEY] = atoms.get_stress(voigt=False).copy()
    atoms.calc = None


def alloy_frames(
    n_structures: int,
    seed: int,
    repeat: Tuple[int, int, int] = (2, 1, 1),
    strain: float = 0.03,
    rattle: float = 0.08,
) -> list:
    """Strained (each cell component by up to ``strain``), rattled (by ``rattle``
    Å) fcc Cu-Au cells of the cubic cell times ``repeat`` (8 atoms), EMT."""
    import numpy as np
    from ase.build import bulk
    from ase.calculators.emt import EMT

    rng = np.random.default_rng(seed)
    frames = []
    for _ in range(n_structures):
        gold = rng.uniform(0.0, 1.0)
        atoms = bulk("Cu", "fcc", a=3.6 + 0.48 * gold, cubic=True).repeat(repeat)
        atoms.numbers = np.where(rng.uniform(size=len(atoms)) < gold, 79, 29)
        deformation = np.eye(3) + rng.uniform(-strain, strain, size=(3, 3))
        atoms.set_cell(atoms.cell[:] @ deformation, scale_atoms=True)
        atoms.positions += rng.normal(0.0, rattle, size=atoms.positions.shape)
        _label(atoms, EMT(), periodic=True)
        frames.append(atoms)
    return frames


#: g2 molecules made of EMT's light elements only, 3 to 12 atoms
MOLECULES = [
    "CH4", "NH3", "H2O", "C2H2", "C2H4", "C2H6", "HCN", "CO2", "CH3OH", "H2CO",
    "CH3CHO", "HCOOH", "CH3CH2OH", "CH3OCH3", "N2H4", "CH2NHCH2", "CH3CN",
    "CH2OCH2", "CH3COOH", "C3H8",
]  # fmt: skip


def molecule_frames(n_structures: int, seed: int) -> list:
    """Rattled small molecules of H, C, N and O, EMT (not periodic)."""
    import numpy as np
    from ase.build import molecule
    from ase.calculators.emt import EMT

    rng = np.random.default_rng(seed)
    frames = []
    for _ in range(n_structures):
        atoms = molecule(MOLECULES[rng.integers(len(MOLECULES))])
        atoms.positions += rng.normal(0.0, 0.06, size=atoms.positions.shape)
        _label(atoms, EMT(), periodic=False)
        frames.append(atoms)
    return frames


def silicon_frames(n_structures: int, seed: int) -> list:
    """Strained, rattled diamond Si cells of 8 atoms (a fifth with a vacancy),
    Tersoff's 1988 silicon parameters."""
    import numpy as np
    from ase.build import bulk
    from ase.calculators.tersoff import Tersoff, TersoffParameters

    silicon = TersoffParameters(
        m=3.0, gamma=1.0, lambda3=1.3258, c=4.8381, d=2.0417, h=0.0, n=22.956,
        beta=0.33675, lambda2=1.3258, B=95.373, R=3.0, D=0.2, lambda1=3.2394,
        A=3264.7,
    )  # fmt: skip
    rng = np.random.default_rng(seed)
    frames = []
    for _ in range(n_structures):
        atoms = bulk("Si", "diamond", a=5.43, cubic=True)
        if rng.uniform() < 0.2:
            del atoms[int(rng.integers(len(atoms)))]
        strain = np.eye(3) + rng.uniform(-0.03, 0.03, size=(3, 3))
        atoms.set_cell(atoms.cell[:] @ strain, scale_atoms=True)
        atoms.positions += rng.normal(0.0, 0.1, size=atoms.positions.shape)
        _label(atoms, Tersoff({("Si", "Si", "Si"): silicon}), periodic=True)
        frames.append(atoms)
    return frames


#: data set name: (maker, periodic, description)
DATASETS = {
    "alloy": (alloy_frames, True, "Cu-Au cells of 8 atoms (EMT)"),
    "molecules": (molecule_frames, False, "C/H/N/O molecules of 3-12 atoms (EMT)"),
    "silicon": (silicon_frames, True, "Si cells of 7-8 atoms (Tersoff)"),
}


def make_data(path: Path, dataset: str, n_structures: int, seed: int) -> None:
    """Write ``n_structures`` labelled structures of ``dataset`` to ``path``."""
    import ase.io

    frames = DATASETS[dataset][0](n_structures, seed)
    ase.io.write(str(path), frames, format="extxyz")


MODEL = {
    "r_max": 5.0,
    "max_ell": 2,
    "correlation": 2,
    "num_interactions": 2,
    "hidden_irreps": "16x0e + 16x1o",
}


def mace_command(
    args: argparse.Namespace,
    train: Path,
    valid: Path,
    recipe: bool,
    periodic: bool,
    seed: int,
) -> List[str]:
    """``mace_run_train`` on the ``train`` and ``valid`` files (``args``: epochs
    and batch size)."""
    options = {
        "--name": "bench",
        "--seed": seed,
        "--train_file": train,
        "--valid_file": valid,
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
    if periodic:
        command += ["--stress_key", STRESS_KEY, "--loss", "stress"]
    if recipe:
        command += ["--ema", "--swa"]
    return command


def recipe_training(epochs: int) -> Dict[str, object]:
    """MACE's recipe in our hypers: MACE's loss weights, EMA and stage two."""
    return {
        "loss": {"energy": {"type": "mse", "weight": 1.0, "forces": {"weight": 100.0}}},
        "ema_decay": 0.99,
        "stage_two_epoch": int(0.75 * epochs),
        "stage_two_loss": {"energy": {"weight": 1000.0, "forces": {"weight": 100.0}}},
        "stage_two_learning_rate": 1.0e-3,
    }


def dataset_yaml(path: Path, periodic: bool) -> str:
    """The data set of ``path`` in a metatrain options file (indented as a
    top-level entry): energies and forces, and stresses of ``periodic`` sets."""
    stress = f"\n    stress:\n      key: {STRESS_KEY}" if periodic else ""
    return textwrap.indent(
        f"systems:\n  read_from: {path}\n  length_unit: angstrom\ntargets:\n"
        f"  energy:\n    key: {ENERGY_KEY}\n    unit: eV\n    forces:\n"
        f"      key: {FORCES_KEY}{stress}",
        "  ",
    )


def metatrain_options(
    args: argparse.Namespace,
    root: Path,
    training: Dict[str, object],
    periodic: bool,
    seed: int,
) -> str:
    model = "\n".join(f"    {key}: {value!r}" for key, value in MODEL.items())
    training_yaml = ""
    if training:
        import yaml

        training_yaml = textwrap.indent(
            yaml.safe_dump(training, default_flow_style=False, sort_keys=False),
            "    ",
        ).rstrip()
    return (
        f"seed: {seed}\nbase_precision: 64\ndevice: cpu\n"
        "architecture:\n  name: experimental.mace\n  model:\n"
        f"{model}\n  training:\n    num_epochs: {args.epochs}\n"
        f"    batch_size: {args.batch_size}\n"
        + (f"{training_yaml}\n" if training_yaml else "")
        + f"training_set:\n{dataset_yaml(root / 'train.xyz', periodic)}\n"
        f"validation_set:\n{dataset_yaml(root / 'valid.xyz', periodic)}\n"
        "test_set: 0.0\n"
    )


def run(command: List[str], workdir: Path, env: Dict[str, str], label: str) -> int:
    start = time.perf_counter()
    with open(workdir / "stdout.log", "w") as log:
        code = subprocess.call(
            command, cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT
        )
    print(f"  {label}: exit {code} after {time.perf_counter() - start:.0f} s")
    return code


def test_errors(calculator, frames) -> Tuple[float, float, float, float]:
    """RMSE of the energy per atom (meV/atom), RMSE and MAE of the forces (meV/Å),
    RMSE of the stress (meV/Å^3; NaN without periodic structures)."""
    import numpy as np

    energy_errors = []
    force_errors = []
    stress_errors = []
    for atoms in frames:
        atoms = atoms.copy()
        atoms.calc = calculator
        energy = atoms.get_potential_energy()
        forces = atoms.get_forces()
        energy_errors.append((energy - atoms.info[ENERGY_KEY]) / len(atoms))
        force_errors.append((forces - atoms.arrays[FORCES_KEY]).ravel())
        if STRESS_KEY in atoms.info:
            stress = atoms.get_stress(voigt=False)
            stress_errors.append((stress - atoms.info[STRESS_KEY]).ravel())
    energy_rmse = float(np.sqrt(np.mean(np.square(energy_errors))))
    force_errors = np.concatenate(force_errors)
    force_rmse = float(np.sqrt(np.mean(np.square(force_errors))))
    force_mae = float(np.mean(np.abs(force_errors)))
    stress_rmse = float("nan")
    if stress_errors:
        stress_rmse = float(np.sqrt(np.mean(np.square(np.concatenate(stress_errors)))))
    return 1000 * energy_rmse, 1000 * force_rmse, 1000 * force_mae, 1000 * stress_rmse


Result = Optional[Tuple[float, float, float, float]]


def load_cache(path: Optional[Path]) -> Dict[str, Result]:
    """Test errors of earlier ``mace_run_train`` runs (``--cache``), by set, seed,
    sizes and label."""
    import json

    if path is None or not path.exists():
        return {}
    return {key: tuple(value) for key, value in json.loads(path.read_text()).items()}


def save_cache(path: Path, key: str, result: Result) -> None:
    import json

    cache = json.loads(path.read_text()) if path.exists() else {}
    cache[key] = result
    path.write_text(json.dumps(cache, indent=1))


def variant(text: str) -> Tuple[str, Dict[str, object]]:
    """``LABEL=YAML``: a run of ours with these training hypers over the defaults."""
    import yaml

    label, _, hypers = text.partition("=")
    training = yaml.safe_load(hypers) if hypers else {}
    if not label or not isinstance(training, dict):
        raise argparse.ArgumentTypeError(
            f"--variant {text!r}: give LABEL=YAML, for example "
            "'ema={ema_decay: 0.99}'"
        )
    return label, training


def run_set(args: argparse.Namespace, dataset: str, seed: int) -> Dict[str, Result]:
    """Train the four runs on one data set with one seed; their test errors."""
    import ase.io

    maker, periodic, description = DATASETS[dataset]
    root = Path(tempfile.mkdtemp(prefix=f"mace_accuracy_{dataset}_{seed}_"))
    print(f"\n== {dataset}, seed {seed}: working directory {root}")
    make_data(root / "train.xyz", dataset, args.train, seed=seed)
    make_data(root / "valid.xyz", dataset, args.valid, seed=seed + 1000)
    make_data(root / "test.xyz", dataset, args.test, seed=seed + 2000)
    print(
        f"data: {args.train} training, {args.valid} validation and {args.test} test "
        f"{description}"
    )

    env = dict(os.environ)
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[name] = "1"
    env["CUDA_VISIBLE_DEVICES"] = ""

    # (program, label, MACE's recipe or our training hypers)
    runs: List[Tuple[str, str, object]] = []
    if args.only in ("all", "mace"):
        runs += [("mace", "mace_run_train (defaults)", False)]
        runs += [("mace", "mace_run_train --ema --swa", True)]
    if args.only in ("all", "ours", "defaults"):
        runs += [("ours", "mtt train (defaults)", {})]
    if args.only in ("all", "ours"):
        runs += [("ours", "mtt train (EMA + stage two)", recipe_training(args.epochs))]
    for label, training in args.variant:
        runs += [("ours", f"mtt train ({label})", training)]

    cache = load_cache(args.cache)
    key = f"{dataset}|{seed}|{args.train}|{args.valid}|{args.test}|{args.epochs}|"
    key += f"{args.batch_size}"
    results: Dict[str, Result] = {}
    jobs: List[Tuple[str, str, Path, List[str]]] = []
    for index, (program, label, settings) in enumerate(runs):
        if program == "mace" and f"{key}|{label}" in cache:
            results[label] = cache[f"{key}|{label}"]
            print(f"  {label}: from {args.cache}")
            continue
        workdir = root / f"run{index}"
        workdir.mkdir()
        if program == "mace":
            command = mace_command(
                args,
                root / "train.xyz",
                root / "valid.xyz",
                bool(settings),
                periodic,
                seed,
            )
        else:
            (workdir / "options.yaml").write_text(
                metatrain_options(args, root, dict(settings), periodic, seed)
            )
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
        if program == "mace" and args.cache is not None:
            save_cache(args.cache, f"{key}|{label}", results[label])
    results = {label: results[label] for _, label, _ in runs}
    print_table(results)
    if not args.keep:
        import shutil

        shutil.rmtree(root)
    return results


def print_table(results: Dict[str, Result]) -> None:
    """Test errors of the runs of one set and seed, and ratios to MACE's best."""
    mace_best = min(
        (r for label, r in results.items() if r and label.startswith("mace")),
        key=lambda r: r[1],
        default=None,
    )
    print(
        f"{'run':<30} {'E RMSE (meV/atom)':>18} {'F RMSE (meV/Å)':>15} "
        f"{'F MAE (meV/Å)':>14} {'S RMSE (meV/Å³)':>16} {'E / MACE best':>14} "
        f"{'F / MACE best':>14}"
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
            f"{result[3]:>16.3f} {ratios[0]:>14} {ratios[1]:>14}"
        )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--sets", default="alloy", help=f"comma-separated, among {list(DATASETS)}"
    )
    parser.add_argument("--seeds", default="7", help="comma-separated seeds")
    parser.add_argument("--epochs", type=int, default=50)
    parser.add_argument("--train", type=int, default=200, help="training structures")
    parser.add_argument("--valid", type=int, default=50, help="validation structures")
    parser.add_argument("--test", type=int, default=100, help="test structures")
    parser.add_argument("--batch-size", type=int, default=10)
    parser.add_argument(
        "--only",
        choices=["all", "ours", "mace", "defaults"],
        default="all",
        help="what to run: 'defaults' is our defaults and the variants only (no "
        "recipe, no mace_run_train)",
    )
    parser.add_argument(
        "--variant",
        type=variant,
        action="append",
        default=[],
        help="LABEL=YAML: one more run of ours with these training hypers, for "
        "example 'ema={ema_decay: 0.99}' (repeatable)",
    )
    parser.add_argument(
        "--cache",
        type=Path,
        default=None,
        help="JSON file of test errors of the mace_run_train runs (they do not "
        "depend on this package): runs found there are not repeated, new ones "
        "are added",
    )
    parser.add_argument("--keep", action="store_true", help="keep the work folders")
    args = parser.parse_args()
    sets = [name.strip() for name in args.sets.split(",") if name.strip()]
    unknown = [name for name in sets if name not in DATASETS]
    if unknown:
        parser.error(f"unknown data sets {unknown}: choose among {list(DATASETS)}")
    seeds = [int(seed) for seed in args.seeds.split(",")]
    print(f"model: {MODEL}; {args.epochs} epochs, batch size {args.batch_size}")

    summary: Dict[Tuple[str, int], Dict[str, Result]] = {}
    for dataset in sets:
        for seed in seeds:
            summary[(dataset, seed)] = run_set(args, dataset, seed)

    print("\n== summary: our defaults / MACE's best run (force RMSE, energy RMSE)")
    met = True
    for (dataset, seed), results in summary.items():
        ours = results.get("mtt train (defaults)")
        mace = [r for label, r in results.items() if r and label.startswith("mace")]
        if ours is None or not mace:
            print(f"{dataset:<10} seed {seed}: incomplete")
            met = False
            continue
        best = min(mace, key=lambda r: r[1])
        forces, energy = ours[1] / best[1], ours[0] / best[0]
        ok = forces <= 0.9 and energy <= 1.0
        met = met and ok
        print(
            f"{dataset:<10} seed {seed}: forces {forces:.2f}, energy {energy:.2f} "
            f"({'met' if ok else 'NOT met'}: forces <= 0.9, energy <= 1.0)"
        )
    print(f"goal {'met' if met else 'NOT met'} on every set")
    failed = any(r is None for results in summary.values() for r in results.values())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
