#!/usr/bin/env python
"""Compare the epoch time of ``mtt train`` (metatrain-mace) with ``mace_run_train``.

Both programs train the same MACE model (same hyperparameters, float64, CPU) on the
same generated data set: perturbed ethanol molecules labelled with ASE's EMT
calculator (energies and forces). Each program runs in a subprocess, in its own
temporary directory, with the same thread settings. The parent reads their log lines
as they are written and timestamps them (the log files of metatrain only have a
resolution of one second), so an epoch lasts from one "epoch done" log line to the
next:

- metatrain: from ``Starting training`` (or ``Calling trainer``) to ``Epoch:    0 |``,
  then from ``Epoch: k-1`` to ``Epoch: k``;
- MACE: from ``Initial:`` (the validation before training) to ``Epoch 0:``, then from
  ``Epoch k-1:`` to ``Epoch k:``.

Every epoch therefore covers one pass of training and one of validation (plus the
bookkeeping each program does per epoch, e.g. MACE's checkpoint on improvement). The
first epoch is reported but left out of the median (warm-up). After the last epoch
the subprocess is stopped (unless ``--full``): export and final evaluation are not
timed.

Run from the repository root::

    python benchmarks/train_speed.py            # defaults: 80 structures, 5 epochs
    python benchmarks/train_speed.py --epochs 8 --repeats 2 --keep

Only packages of the metatrain-mace environment are used (ase, metatrain,
mace-torch); nothing is downloaded.
"""

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional


ENERGY_KEY = "REF_energy"
FORCES_KEY = "REF_forces"


# --------------------------------------------------------------------------- data


def make_data(path: Path, n_structures: int, seed: int, displacement: float) -> None:
    """Perturbed ethanol molecules labelled with EMT energies and forces."""
    import ase.io
    import numpy as np
    from ase.build import molecule
    from ase.calculators.emt import EMT

    rng = np.random.default_rng(seed)
    frames = []
    for _ in range(n_structures):
        atoms = molecule("CH3CH2OH")
        atoms.positions += rng.uniform(
            -displacement, displacement, size=atoms.positions.shape
        )
        atoms.calc = EMT()
        energy = float(atoms.get_potential_energy())
        forces = atoms.get_forces().copy()
        atoms.calc = None
        atoms.info[ENERGY_KEY] = energy
        atoms.arrays[FORCES_KEY] = forces
        frames.append(atoms)
    ase.io.write(str(path), frames, format="extxyz")


# ----------------------------------------------------------------------- settings


@dataclass
class Settings:
    epochs: int
    channels: int
    batch_size: int
    seed: int
    lr: float = 0.01
    weight_decay: float = 5e-7
    r_max: float = 5.0
    num_radial_basis: int = 8
    num_cutoff_basis: int = 5
    max_ell: int = 3
    correlation: int = 3
    num_interactions: int = 2
    mlp_irreps: str = "16x0e"
    radial_mlp: list[int] = field(default_factory=lambda: [64, 64, 64])
    energy_weight: float = 1.0
    forces_weight: float = 1.0

    @property
    def hidden_irreps(self) -> str:
        return f"{self.channels}x0e + {self.channels}x1o"


def mace_command(s: Settings, train: Path, valid: Path) -> list[str]:
    args = {
        "--name": "bench",
        "--seed": s.seed,
        "--train_file": train,
        "--valid_file": valid,
        "--energy_key": ENERGY_KEY,
        "--forces_key": FORCES_KEY,
        "--E0s": "average",
        "--model": "MACE",
        "--r_max": s.r_max,
        "--num_radial_basis": s.num_radial_basis,
        "--num_cutoff_basis": s.num_cutoff_basis,
        "--max_ell": s.max_ell,
        "--correlation": s.correlation,
        "--num_interactions": s.num_interactions,
        "--hidden_irreps": s.hidden_irreps,
        "--MLP_irreps": s.mlp_irreps,
        "--radial_MLP": str(s.radial_mlp),
        "--gate": "silu",
        "--interaction": "RealAgnosticResidualInteractionBlock",
        "--scaling": "rms_forces_scaling",
        "--batch_size": s.batch_size,
        "--valid_batch_size": s.batch_size,
        "--max_num_epochs": s.epochs,
        "--eval_interval": 1,
        "--loss": "weighted",
        "--energy_weight": s.energy_weight,
        "--forces_weight": s.forces_weight,
        "--optimizer": "adam",
        "--lr": s.lr,
        "--weight_decay": s.weight_decay,
        "--scheduler": "ReduceLROnPlateau",
        "--lr_factor": 0.8,
        "--scheduler_patience": 50,
        "--clip_grad": 10.0,
        "--default_dtype": "float64",
        "--device": "cpu",
        "--num_workers": 0,
        "--pin_memory": "False",
        "--plot": "False",
        "--log_dir": "logs",
        "--model_dir": ".",
        "--checkpoints_dir": "checkpoints",
        "--results_dir": "results",
    }
    command = [
        sys.executable,
        "-c",
        "import sys; from mace.cli.run_train import main; sys.exit(main())",
    ]
    for key, value in args.items():
        command += [key, str(value)]
    # store_true flags: amsgrad is on by default in mace-torch (and cannot be turned
    # off from the CLI); --ema and --swa are simply not given
    command.append("--amsgrad")
    return command


def metatrain_options(s: Settings, train: Path, valid: Path) -> str:
    radial_mlp = ", ".join(str(width) for width in s.radial_mlp)

    def dataset(path: Path) -> str:
        return textwrap.indent(
            textwrap.dedent(
                f"""\
                systems:
                  read_from: {path}
                  length_unit: angstrom
                targets:
                  energy:
                    key: {ENERGY_KEY}
                    unit: eV
                    forces:
                      key: {FORCES_KEY}"""
            ),
            " " * 10,
        ).lstrip()

    return textwrap.dedent(
        f"""\
        seed: {s.seed}
        base_precision: 64
        device: cpu
        architecture:
          name: experimental.mace
          model:
            r_max: {s.r_max}
            num_radial_basis: {s.num_radial_basis}
            num_cutoff_basis: {s.num_cutoff_basis}
            max_ell: {s.max_ell}
            correlation: {s.correlation}
            num_interactions: {s.num_interactions}
            hidden_irreps: "{s.hidden_irreps}"
            MLP_irreps: "{s.mlp_irreps}"
            radial_MLP: [{radial_mlp}]
            gate: silu
            # mace_run_train --model MACE always uses this block for the first layer
            interaction: RealAgnosticResidualInteractionBlock
            interaction_first: RealAgnosticInteractionBlock
          training:
            num_epochs: {s.epochs}
            batch_size: {s.batch_size}
            optimizer: adam
            learning_rate: {s.lr}
            weight_decay: {s.weight_decay}
            amsgrad: true
            lr_scheduler: ReduceLROnPlateau
            lr_factor: 0.8
            lr_scheduler_patience: 50
            grad_clip_norm: 10.0
            scale_targets: true
            num_workers: 0
            log_interval: 1
            loss:
              energy:
                type: mse
                weight: {s.energy_weight}
                gradients:
                  positions:
                    type: mse
                    weight: {s.forces_weight}
        training_set:
          {dataset(train)}
        validation_set:
          {dataset(valid)}
        test_set: 0.0
        """
    )


# ------------------------------------------------------------------------ running


@dataclass
class Program:
    name: str
    short: str
    # log lines that mark the start of epoch 0 (the last one seen before epoch 0 wins)
    start: list[re.Pattern[str]]
    # log line that marks the end of an epoch, with the epoch number as group 1
    epoch: re.Pattern[str]


MTT = Program(
    name="metatrain-mace (mtt train)",
    short="ours",
    start=[re.compile(r"Calling trainer"), re.compile(r"Starting training")],
    epoch=re.compile(r"Epoch:\s*(\d+)\s*\|"),
)
MACE = Program(
    name="mace-torch (mace_run_train)",
    short="MACE",
    start=[re.compile(r"INFO: Initial:")],
    epoch=re.compile(r"INFO: Epoch (\d+):"),
)


def cpu_seconds(pid: int) -> Optional[float]:
    """User + system CPU time of a running process (all its threads), Linux only."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    # fields[11] and fields[12] are utime and stime (fields 14 and 15 of proc(5))
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def durations(start: Optional[float], ends: dict[int, float]) -> list[float]:
    """Epoch durations from the start mark and the end mark of every epoch."""
    result: list[float] = []
    previous = start
    for epoch in sorted(ends):
        if previous is not None:
            result.append(ends[epoch] - previous)
        previous = ends[epoch]
    return result


def median_after_first(values: list[float]) -> Optional[float]:
    timed = values[1:]
    return statistics.median(timed) if timed else None


@dataclass
class Result:
    program: str
    returncode: Optional[int]
    startup: Optional[float]  # process start -> start of epoch 0 (wall, s)
    epochs: list[float]  # wall time of each epoch (s)
    cpu_epochs: list[float]  # CPU time (user + system) of each epoch (s)
    load: tuple[float, float]
    error: str = ""


def run_program(
    program: Program,
    command: list[str],
    workdir: Path,
    env: dict[str, str],
    n_epochs: int,
    full: bool,
    timeout: float,
    verbose: bool,
) -> Result:
    log_path = workdir / "stdout.log"
    (workdir / "command.txt").write_text(" ".join(repr(c) for c in command) + "\n")
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    start: Optional[float] = None
    cpu_start: Optional[float] = None
    ends: dict[int, float] = {}
    cpu_ends: dict[int, float] = {}
    tail: list[str] = []
    stopped = False
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            command,
            cwd=workdir,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
        )
        assert process.stdout is not None
        # stop a run that hangs (the timer fires even when no line arrives)
        timer = threading.Timer(timeout, process.terminate)
        timer.daemon = True
        timer.start()
        for line in process.stdout:
            now = time.perf_counter()
            log.write(line)
            if line.strip():
                tail = (tail + [line.rstrip()])[-25:]
            if verbose:
                print(f"    {program.short} | {line.rstrip()}", flush=True)
            if not ends and any(p.search(line) for p in program.start):
                start = now
                cpu_start = cpu_seconds(process.pid)
            match = program.epoch.search(line)
            if match:
                epoch = int(match.group(1))
                if epoch not in ends:  # multi-head logs repeat the epoch line
                    ends[epoch] = now
                    cpu = cpu_seconds(process.pid)
                    if cpu is not None:
                        cpu_ends[epoch] = cpu
                    print(
                        f"    {program.short}: epoch {epoch} done at {now - t0:8.2f} s "
                        f"(CPU {cpu if cpu is not None else float('nan'):8.2f} s)",
                        flush=True,
                    )
                if len(ends) == n_epochs and not full:
                    stopped = True
                    process.terminate()
                    break
        timer.cancel()
        process.stdout.close()
        try:
            returncode = process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            returncode = process.wait()
        if not stopped and time.perf_counter() - t0 >= timeout:
            print(f"    stopped after the timeout of {timeout:.0f} s", flush=True)
    load_after = os.getloadavg()

    error = ""
    if len(ends) < n_epochs:
        error = "\n".join(tail)
    return Result(
        program=program.name,
        returncode=None if stopped else returncode,
        startup=None if start is None else start - t0,
        epochs=durations(start, ends),
        cpu_epochs=durations(cpu_start, cpu_ends) if len(cpu_ends) == len(ends) else [],
        load=(load_before[0], load_after[0]),
        error=error,
    )


# ------------------------------------------------------------------------- report


def fmt(value: Optional[float], digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def print_table(results: list[Result], n_epochs: int) -> None:
    print()
    header = (
        f"{'program':<28} {'epochs':>6} {'startup':>8} {'median epoch':>12} "
        f"{'median CPU':>10}  wall time of every epoch"
    )
    print(header)
    print(
        f"{'':<28} {'':>6} {'(s)':>8} {'wall (s)':>12} {'(s)':>10}  "
        "(s, the first is not in the medians)"
    )
    print("-" * (len(header) + 12))
    for r in results:
        all_epochs = " ".join(f"{d:.2f}" for d in r.epochs) or "-"
        print(
            f"{r.program:<28} {len(r.epochs):>3}/{n_epochs:<2} {fmt(r.startup, 1):>8} "
            f"{fmt(median_after_first(r.epochs), 3):>12} "
            f"{fmt(median_after_first(r.cpu_epochs), 3):>10}  {all_epochs}"
        )
    print()


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--epochs", type=int, default=5, help="epochs per run")
    parser.add_argument(
        "--structures",
        type=int,
        default=80,
        help="training structures (a multiple of --batch-size, so that no program "
        "drops or pads a partial batch)",
    )
    parser.add_argument(
        "--valid-structures", type=int, default=10, help="validation structures"
    )
    parser.add_argument(
        "--channels",
        type=int,
        default=32,
        help="channels of the hidden irreps ('Cx0e + Cx1o')",
    )
    parser.add_argument("--batch-size", type=int, default=5)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="OMP/MKL threads of both subprocesses (torch intra-op threads). One "
        "thread is the default because several threads per process on a small, "
        "shared machine make timings swing by up to 10x (OpenMP threads waiting "
        "for a busy core); use --threads 2 on an idle 2-core machine",
    )
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument(
        "--repeats",
        type=int,
        default=2,
        help="runs of each program; the order alternates (MACE first, then ours "
        "first, ...); the medians pool the epochs of all runs",
    )
    parser.add_argument(
        "--only", choices=["both", "ours", "mace"], default="both", help="what to run"
    )
    parser.add_argument(
        "--full",
        action="store_true",
        help="let each program finish (export, final evaluation) instead of "
        "stopping it after the last epoch; not timed either way",
    )
    parser.add_argument(
        "--timeout", type=float, default=1200.0, help="seconds per run at most"
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep the temporary directories"
    )
    parser.add_argument(
        "--verbose", action="store_true", help="echo the programs' output"
    )
    args = parser.parse_args()
    if args.epochs < 2:
        parser.error("--epochs must be at least 2 (the first epoch is not timed)")
    if args.structures % args.batch_size != 0:
        # mace_run_train drops the last partial training batch, metatrain keeps it:
        # with a partial batch the two programs would not do the same work
        parser.error(
            f"--structures ({args.structures}) must be a multiple of --batch-size "
            f"({args.batch_size})"
        )

    settings = Settings(
        epochs=args.epochs,
        channels=args.channels,
        batch_size=args.batch_size,
        seed=args.seed,
    )

    root = Path(tempfile.mkdtemp(prefix="mace_train_speed_"))
    train = root / "train.xyz"
    valid = root / "valid.xyz"
    print(f"working directory: {root}")
    make_data(train, args.structures, seed=args.seed, displacement=0.08)
    make_data(valid, args.valid_structures, seed=args.seed + 1, displacement=0.08)
    print(
        f"data: {args.structures} training and {args.valid_structures} validation "
        f"ethanol structures (EMT energies and forces), {train} and {valid}"
    )
    print(
        f"model: hidden_irreps '{settings.hidden_irreps}', r_max {settings.r_max}, "
        f"max_ell {settings.max_ell}, correlation {settings.correlation}, "
        f"{settings.num_interactions} interactions, float64, CPU"
    )
    print(
        f"training: {args.epochs} epochs, batch size {args.batch_size}, "
        f"{args.threads} thread(s)"
    )

    env = dict(os.environ)
    for name in (
        "OMP_NUM_THREADS",
        "MKL_NUM_THREADS",
        "OPENBLAS_NUM_THREADS",
        "NUMEXPR_NUM_THREADS",
    ):
        env[name] = str(args.threads)
    env["PYTHONUNBUFFERED"] = "1"  # log lines must reach us when they are written
    env["CUDA_VISIBLE_DEVICES"] = ""

    programs = []
    if args.only in ("both", "mace"):
        programs.append("mace")
    if args.only in ("both", "ours"):
        programs.append("ours")

    # Both programs run at the same time (each on its own core) when there are
    # enough cores: then they see the same machine, and the slow drifts of a shared
    # machine (other jobs, clock changes) cancel in the ratio. Otherwise they run
    # one after the other, alternating which goes first.
    cores = os.cpu_count() or 1
    concurrent = len(programs) == 2 and cores >= 2 * args.threads
    print(
        "running both programs at the same time"
        if concurrent
        else "running the programs one after the other"
    )

    def job(which: str, repeat: int) -> tuple[Program, list[str], Path]:
        workdir = root / f"{which}_{repeat}"
        workdir.mkdir()
        if which == "mace":
            return MACE, mace_command(settings, train, valid), workdir
        (workdir / "options.yaml").write_text(metatrain_options(settings, train, valid))
        command = [
            sys.executable,
            "-c",
            "import sys; from metatrain.__main__ import main; sys.exit(main())",
            "train",
            "options.yaml",
            "-o",
            "model.pt",
        ]
        return MTT, command, workdir

    def run(which: str, program: Program, command: list[str], workdir: Path) -> None:
        result = run_program(
            program,
            command,
            workdir,
            env,
            n_epochs=args.epochs,
            full=args.full,
            timeout=args.timeout,
            verbose=args.verbose,
        )
        if result.error:
            print(
                f"    {program.name} did not finish its epochs "
                f"(exit code {result.returncode}); last lines:"
            )
            print(textwrap.indent(result.error, "    | "))
        if max(result.load) > cores:
            print(
                f"    note: load average {result.load[0]:.1f} -> "
                f"{result.load[1]:.1f} on {cores} cores: other processes "
                "competed for the CPU, timings may be noisy"
            )
        results[which].append(result)

    results: dict[str, list[Result]] = {"mace": [], "ours": []}
    for repeat in range(args.repeats):
        order = programs if repeat % 2 == 0 else programs[::-1]
        jobs = [(which, *job(which, repeat)) for which in order]
        for _, program, _, workdir in jobs:
            print(f"\n[{repeat + 1}/{args.repeats}] {program.name} in {workdir}")
        if concurrent:
            threads = [threading.Thread(target=run, args=j) for j in jobs]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        else:
            for j in jobs:
                run(*j)

    all_results = results["mace"] + results["ours"]
    print_table(all_results, args.epochs)

    def pooled_median(rs: list[Result], cpu: bool = False) -> Optional[float]:
        timed = [d for r in rs for d in (r.cpu_epochs if cpu else r.epochs)[1:]]
        return statistics.median(timed) if timed else None

    ours = pooled_median(results["ours"])
    mace = pooled_median(results["mace"])
    runs = f", {args.repeats} runs each" if args.repeats > 1 else ""
    if ours is not None and mace is not None:
        ratio = ours / mace
        print(
            f"median wall time per epoch (epochs 2-{args.epochs}{runs}): "
            f"ours {ours:.3f} s, MACE {mace:.3f} s"
        )
        print(
            f"ratio ours / MACE = {ratio:.2f} "
            f"({'target <= 1.0 met' if ratio <= 1.0 else 'target <= 1.0 NOT met'})"
        )
        pairs = [
            (median_after_first(o.epochs), median_after_first(m.epochs))
            for o, m in zip(results["ours"], results["mace"], strict=False)
        ]
        per_repeat = [f"{o / m:.3f}" for o, m in pairs if o and m]
        if per_repeat:
            print(f"ratio of every repeat (median epochs): {' '.join(per_repeat)}")
        ours_cpu = pooled_median(results["ours"], cpu=True)
        mace_cpu = pooled_median(results["mace"], cpu=True)
        if ours_cpu and mace_cpu:
            print(
                f"(CPU time per epoch: ours {ours_cpu:.3f} s, MACE {mace_cpu:.3f} s, "
                f"ratio {ours_cpu / mace_cpu:.2f})"
            )
    elif args.only == "both":
        print("ratio ours / MACE: not available (a program did not run its epochs)")

    if args.keep:
        print(f"\nkept {root}")
    else:
        shutil.rmtree(root, ignore_errors=True)

    failed = any(r.error for r in all_results)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
