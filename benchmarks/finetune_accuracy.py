#!/usr/bin/env python
"""Fine-tuning accuracy of ``mtt train`` (metatrain-mace) against ``mace_run_train``.

A small "foundation" MACE is trained by ``mace_run_train`` on EMT Cu-Au cells (the
``alloy`` set of ``accuracy.py``). It is then fine-tuned on a few cells of another
"level of theory": EMT with other parameters for copper and gold (larger cells,
stronger strain and rattling), the situation of a user who fine-tunes a foundation
model on a small set of their own periodic data. All runs start from the same file,
see the same data and run the same number of epochs:

- ``mace_run_train --foundation_model`` with its defaults (naive fine-tuning: every
  parameter, its training defaults; without pretraining data mace-torch turns its
  multi-head fine-tuning off);
- ``mace_run_train --foundation_model --pt_train_file`` with its defaults
  (multi-head replay fine-tuning: learning rate 1e-4, EMA decay 0.99999, a replay
  head on the pretraining data);
- ``mtt train`` from the file (``mace_model``) with this package's defaults (every
  parameter trains);
- ``mtt train`` with ``finetune: method: heads`` (MACE's readouts train) and
  ``finetune: method: lora`` (rank 4 adapters on the interactions' and products'
  linear layers), each from a zero-epoch checkpoint of the file;
- ``--variant LABEL=YAML`` (repeatable): more full fine-tunings of ours with these
  training hypers over the defaults.

The parent process prints, for the fine-tuning test set and for held-out cells of
the foundation's own data (what fine-tuning forgets), the RMSE of the energy per
atom, of the forces and of the stress of every model, and of the foundation as it
was.

Run from the repository root::

    python benchmarks/finetune_accuracy.py                 # about 15 minutes
    python benchmarks/finetune_accuracy.py --epochs 2 --pretrain-epochs 2  # smoke

Only packages of the metatrain-mace environment are used; nothing is downloaded.
"""

import argparse
import contextlib
import os
import sys
import tempfile
import textwrap
import threading
from pathlib import Path
from typing import Dict, Iterator, List, Tuple

import yaml


sys.path.insert(0, str(Path(__file__).parent))

from accuracy import (  # noqa: E402
    Result,
    alloy_frames,
    dataset_yaml,
    mace_command,
    make_data,
    run,
    test_errors,
    variant,
)


#: EMT parameters of the fine-tuning data: V0 (cohesion) 15% larger, s0 (the
#: neighbour distance) 2% larger than ASE's Cu and Au
SHIFTED = {"Cu": {"V0": 1.15, "s0": 1.02}, "Au": {"V0": 1.15, "s0": 1.02}}


@contextlib.contextmanager
def shifted_emt() -> Iterator[None]:
    """ASE's EMT with the parameters of ``SHIFTED`` while inside."""
    from ase.calculators import emt

    saved = dict(emt.parameters)
    names = ["E0", "s0", "V0", "eta2", "kappa", "lambda", "n0"]
    try:
        for element, factors in SHIFTED.items():
            values = list(emt.parameters[element])
            for name, factor in factors.items():
                values[names.index(name)] *= factor
            emt.parameters[element] = tuple(values)
        yield
    finally:
        emt.parameters.clear()
        emt.parameters.update(saved)


def finetune_frames(n_structures: int, seed: int) -> list:
    """Cu-Au cells of 16 atoms, strained by up to 5% and rattled by 0.12 Å,
    labelled by the shifted EMT."""
    with shifted_emt():
        return alloy_frames(
            n_structures, seed, repeat=(2, 2, 1), strain=0.05, rattle=0.12
        )


def write(path: Path, frames: list) -> None:
    import ase.io

    ase.io.write(str(path), frames, format="extxyz")


def ours_options(
    root: Path, seed: int, epochs: int, batch_size: int, training: str, model: str
) -> str:
    return (
        f"seed: {seed}\nbase_precision: 64\ndevice: cpu\n"
        "architecture:\n  name: experimental.mace\n"
        f"  model:\n{textwrap.indent(model, '    ')}\n"
        f"  training:\n    num_epochs: {epochs}\n    batch_size: {batch_size}\n"
        f"{textwrap.indent(training, '    ')}\n"
        f"training_set:\n{dataset_yaml(root / 'train.xyz', True)}\n"
        f"validation_set:\n{dataset_yaml(root / 'valid.xyz', True)}\n"
        "test_set: 0.0\n"
    )


MTT = [
    sys.executable,
    "-c",
    "import sys; from metatrain.__main__ import main; sys.exit(main())",
]


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--pretrain", type=int, default=150, help="foundation data")
    parser.add_argument("--pretrain-epochs", type=int, default=30)
    parser.add_argument("--train", type=int, default=30, help="fine-tuning data")
    parser.add_argument("--valid", type=int, default=10)
    parser.add_argument("--test", type=int, default=40)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=5)
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    parser.add_argument(
        "--variant",
        type=variant,
        action="append",
        default=[],
        help="LABEL=YAML: one more full fine-tuning of ours with these training "
        "hypers, for example 'lr3={learning_rate: 0.001}' (repeatable)",
    )
    args = parser.parse_args()
    seed = args.seed

    root = Path(tempfile.mkdtemp(prefix="mace_finetune_accuracy_"))
    print(f"working directory {root}")
    make_data(root / "pretrain.xyz", "alloy", args.pretrain, seed=seed)
    make_data(root / "pretrain_valid.xyz", "alloy", 20, seed=seed + 500)
    write(root / "forget_test.xyz", alloy_frames(args.test, seed=seed + 600))
    write(root / "train.xyz", finetune_frames(args.train, seed=seed + 1000))
    write(root / "valid.xyz", finetune_frames(args.valid, seed=seed + 2000))
    write(root / "test.xyz", finetune_frames(args.test, seed=seed + 3000))
    print(
        f"foundation: {args.pretrain} EMT Cu-Au cells, {args.pretrain_epochs} "
        f"epochs; fine-tuning: {args.train} training, {args.valid} validation and "
        f"{args.test} test cells of 16 atoms (EMT with {SHIFTED}), {args.epochs} "
        "epochs"
    )

    env = dict(os.environ)
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[name] = "2"
    env["CUDA_VISIBLE_DEVICES"] = ""

    # the foundation
    foundation_dir = root / "foundation"
    foundation_dir.mkdir()
    pretrain_args = argparse.Namespace(
        batch_size=10, epochs=args.pretrain_epochs, train=args.pretrain
    )
    command = mace_command(
        pretrain_args,
        root / "pretrain.xyz",
        root / "pretrain_valid.xyz",
        True,
        True,
        seed,
    )
    if run([str(c) for c in command], foundation_dir, env, "foundation") != 0:
        print(f"the foundation failed: see {foundation_dir / 'stdout.log'}")
        return 1
    foundation = foundation_dir / "bench_stagetwo.model"
    if not foundation.exists():
        foundation = foundation_dir / "bench.model"

    # a zero-epoch checkpoint of ours for the 'heads' and 'lora' methods
    base_dir = root / "base"
    base_dir.mkdir()
    (base_dir / "options.yaml").write_text(
        ours_options(root, seed, 0, args.batch_size, "", f"mace_model: {foundation}")
    )
    if run([*MTT, "train", "options.yaml"], base_dir, env, "zero-epoch checkpoint"):
        print(f"the zero-epoch run failed: see {base_dir / 'stdout.log'}")
        return 1
    base = base_dir / "model.ckpt"

    mace_finetune = [
        "--foundation_model",
        str(foundation),
        "--E0s",
        "foundation",
    ]
    finetune_args = argparse.Namespace(
        batch_size=args.batch_size, epochs=args.epochs, train=args.train
    )
    runs: List[Tuple[str, str, List[str]]] = []
    naive = mace_command(
        finetune_args, root / "train.xyz", root / "valid.xyz", False, True, seed
    )
    runs.append(("mace", "mace_run_train naive", naive + mace_finetune))
    multihead = (
        naive
        + mace_finetune
        + [
            "--pt_train_file",
            str(root / "pretrain.xyz"),
            "--multiheads_finetuning",
            "True",
        ]
    )
    runs.append(("mace", "mace_run_train multi-head", multihead))
    methods = {
        "mtt train full (defaults)": ("", f"mace_model: {foundation}"),
        "mtt train heads (defaults)": (
            textwrap.dedent(
                f"""\
                finetune:
                  method: heads
                  read_from: {base}
                  config:
                    head_modules: ["heads"]
                    last_layer_modules: ["mace.readouts"]"""
            ),
            f"mace_model: {foundation}",
        ),
        "mtt train lora (defaults)": (
            textwrap.dedent(
                f"""\
                finetune:
                  method: lora
                  read_from: {base}
                  config:
                    rank: 4
                    alpha: 8.0
                    target_modules:
                      - "mace.interactions.*.linear"
                      - "mace.products.*.linear"
                    trainable_modules: ["mace.readouts"]"""
            ),
            f"mace_model: {foundation}",
        ),
    }
    for label, hypers in args.variant:
        training = yaml.safe_dump(hypers, default_flow_style=False, sort_keys=False)
        methods[f"mtt train full ({label})"] = (
            training.rstrip(),
            f"mace_model: {foundation}",
        )
    for label, (training, model) in methods.items():
        workdir = root / f"run{len(runs)}"
        workdir.mkdir()
        (workdir / "options.yaml").write_text(
            ours_options(root, seed, args.epochs, args.batch_size, training, model)
        )
        runs.append(("ours", label, [*MTT, "train", "options.yaml", "-o", "model.pt"]))

    single = dict(env)
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        single[name] = "1"
    codes: Dict[str, int] = {}
    pending = list(enumerate(runs))
    while pending:
        batch, pending = pending[:2], pending[2:]
        threads = []
        for index, (_program, label, command) in batch:
            workdir = root / f"run{index}"
            workdir.mkdir(exist_ok=True)

            def target(label=label, workdir=workdir, command=command) -> None:
                codes[label] = run([str(c) for c in command], workdir, single, label)

            threads.append(threading.Thread(target=target))
            threads[-1].start()
        for thread in threads:
            thread.join()

    import ase.io
    from mace.calculators import MACECalculator
    from metatomic_ase import MetatomicCalculator

    test = ase.io.read(str(root / "test.xyz"), ":")
    forget = ase.io.read(str(root / "forget_test.xyz"), ":")
    results: Dict[str, Tuple[Result, Result]] = {}

    def mace_calculator(path: Path) -> MACECalculator:
        return MACECalculator(
            model_paths=str(path), device="cpu", default_dtype="float64"
        )

    calculator = mace_calculator(foundation)
    results["foundation (not fine-tuned)"] = (
        test_errors(calculator, test),
        test_errors(calculator, forget),
    )
    for index, (program, label, _) in enumerate(runs):
        workdir = root / f"run{index}"
        if codes[label] != 0:
            print(f"{label} failed; see {workdir / 'stdout.log'}")
            results[label] = (None, None)
            continue
        if program == "mace":
            models = sorted(workdir.glob("bench*_stagetwo.model")) or sorted(
                workdir.glob("bench*.model")
            )
            calculator = mace_calculator(models[0])
            if "multi-head" in label:
                calculator = MACECalculator(
                    model_paths=str(models[0]),
                    device="cpu",
                    default_dtype="float64",
                    head="Default",
                )
        else:
            calculator = MetatomicCalculator(str(workdir / "model.pt"))
        results[label] = (
            test_errors(calculator, test),
            test_errors(calculator, forget),
        )

    print(
        f"\n{'run':<30} {'fine-tuning test: E':>20} {'F':>8} {'S':>8}"
        f" {'foundation data: E':>20} {'F':>8}"
    )
    for label, (new, old) in results.items():
        if new is None or old is None:
            print(f"{label:<30} failed")
            continue
        print(
            f"{label:<30} {new[0]:>20.2f} {new[1]:>8.2f} {new[3]:>8.3f} "
            f"{old[0]:>20.2f} {old[1]:>8.2f}"
        )
    print("(E: meV/atom, F: meV/Å, S: meV/Å³; RMSE)")
    mace_best = min(
        (new for label, (new, _) in results.items() if new and "mace_run" in label),
        key=lambda r: r[1],
        default=None,
    )
    ours = results.get("mtt train full (defaults)", (None, None))[0]
    if mace_best is not None and ours is not None:
        print(
            f"ours (full, defaults) / MACE's best: forces {ours[1] / mace_best[1]:.2f},"
            f" energy {ours[0] / mace_best[0]:.2f}"
        )
    if not args.keep:
        import shutil

        shutil.rmtree(root)
    return 1 if any(new is None for new, _ in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
