#!/usr/bin/env python
"""Time an exported MACE file through metatomic's ASE calculator against MACE's own.

The same MACE model file is evaluated (energy and forces, float64, CPU) by

- mace-torch's ``MACECalculator`` on the file, and
- metatomic's ``MetatomicCalculator`` on the model exported by
  ``metatrain_mace.export_mace_model`` from that file, and
- with ``--symmetrix``, symmetrix-xl (a native CPU MACE engine) on the MACE file that
  ``metatrain-mace to-mace`` writes back from our model: the same model, as a model
  trained here reaches native MACE engines,

on carbon diamond supercells of 64, 216 and 512 atoms. Both calculators live in this
one process and are timed alternately on the same rattled structures, so machine
noise hits both alike; the script prints the median time per call and the ratio
(ours / MACE; the target is <= 1.05) for every size, and checks that energies and
forces agree.

Without ``--model``, a model the size of MACE-MP-0 "medium" is built with random
weights (128x0e + 128x1o, max_ell 3, correlation 3, 2 interactions, r_max 6, 10
Bessel functions, 89 elements): timing does not depend on the weights. Nothing is
downloaded. Run from the repository root::

    python benchmarks/ase_speed.py                    # about 20 minutes
    python benchmarks/ase_speed.py --model mace-mp-0-medium.model --repeats 30
"""

import argparse
import importlib
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import List


def build_model_file(path: Path) -> None:
    """A MACE-MP-0-medium-sized ScaleShiftMACE with random weights, saved whole."""
    import numpy as np
    import torch
    from mace import modules  # first: it makes e3nn importable with torch >= 2.6

    o3 = importlib.import_module("e3nn.o3")

    torch.set_default_dtype(torch.float64)
    torch.manual_seed(0)
    elements = list(range(1, 90))
    model = modules.ScaleShiftMACE(
        atomic_inter_scale=0.8,
        atomic_inter_shift=0.1,
        r_max=6.0,
        num_bessel=10,
        num_polynomial_cutoff=5,
        max_ell=3,
        interaction_cls=modules.interaction_classes[
            "RealAgnosticResidualInteractionBlock"
        ],
        interaction_cls_first=modules.interaction_classes[
            "RealAgnosticResidualInteractionBlock"
        ],
        num_interactions=2,
        num_elements=len(elements),
        hidden_irreps=o3.Irreps("128x0e + 128x1o"),
        MLP_irreps=o3.Irreps("16x0e"),
        atomic_energies=np.random.default_rng(0).uniform(-5, -1, len(elements)),
        avg_num_neighbors=30.0,
        atomic_numbers=elements,
        correlation=3,
        gate=torch.nn.functional.silu,
        radial_MLP=[64, 64, 64],
    )
    torch.save(model, path)


def supercell(n: int, seed: int):
    """A rattled ``n x n x n`` carbon diamond supercell (8 atoms per cell)."""
    import ase.build

    atoms = ase.build.bulk("C", "diamond", a=3.567, cubic=True) * (n, n, n)
    atoms.rattle(0.02, seed=seed)
    return atoms


def time_calls(calculators: dict, atoms, repeats: int) -> dict:
    """Alternate energy+forces calls of every calculator on freshly rattled atoms."""
    import numpy as np

    times = {name: [] for name in calculators}
    results = {}
    rng = np.random.default_rng(1)
    base = atoms.get_positions()
    for repeat in range(repeats + 1):
        positions = base + rng.normal(scale=0.01, size=base.shape)
        order = list(calculators.items())
        if repeat % 2:
            order.reverse()
        for name, calculator in order:
            trial = atoms.copy()
            trial.set_positions(positions)
            trial.calc = calculator
            start = time.perf_counter()
            energy = trial.get_potential_energy()
            forces = trial.get_forces()
            elapsed = time.perf_counter() - start
            if repeat > 0:  # the first call of each is warm-up
                times[name].append(elapsed)
            results[name] = (energy, forces)
    return {"times": times, "results": results}


def main(argv: List[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="MACE model file (default: build one)")
    parser.add_argument("--sizes", default="2,3,4", help="supercell repeats n")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--symmetrix",
        action="store_true",
        help="also time symmetrix-xl on the file written by metatrain-mace to-mace",
    )
    args = parser.parse_args(argv)

    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    from mace.calculators import MACECalculator
    from metatomic_ase import MetatomicCalculator

    from metatrain_mace import export_mace_model
    from metatrain_mace.tools.export import mace_file_to_model
    from metatrain_mace.tools.to_mace import to_mace_module

    with tempfile.TemporaryDirectory() as tmp:
        model_file = Path(args.model) if args.model else Path(tmp) / "mace.model"
        if not args.model:
            print("building a MACE-MP-0-medium-sized model file (random weights)...")
            build_model_file(model_file)
        exported = Path(tmp) / "model.pt"
        export_mace_model(str(model_file), str(exported), dtype="float64")
        torch.set_default_dtype(torch.float64)
        calculators = {
            "mace": MACECalculator(
                model_paths=str(model_file), device="cpu", default_dtype="float64"
            ),
            "ours": MetatomicCalculator(str(exported), device="cpu"),
        }
        if args.symmetrix:
            from symmetrix import Symmetrix

            written = Path(tmp) / "written.model"
            torch.save(to_mace_module(mace_file_to_model(str(model_file))), written)
            print("loading symmetrix-xl (builds its model-specific code once)...")
            calculators["symmetrix"] = Symmetrix(str(written), dtype="float64")
        print(
            f"torch {torch.__version__}, {args.threads} thread(s), float64, "
            f"{args.repeats} timed calls per calculator and size"
        )
        header = f"{'atoms':>6} {'MACE (ms)':>10} {'ours (ms)':>10} {'ratio':>6}  "
        header += "max|dE| (eV)  max|dF| (eV/A)"
        if args.symmetrix:
            header += f"  {'symmetrix (ms)':>14} {'ours/sym':>8}  sym max|dE| max|dF|"
        print(header)
        for n in (int(s) for s in args.sizes.split(",")):
            atoms = supercell(n, seed=n)
            run = time_calls(calculators, atoms, args.repeats)
            mace_t = statistics.median(run["times"]["mace"])
            ours_t = statistics.median(run["times"]["ours"])
            (e_ref, f_ref), (e_ours, f_ours) = (
                run["results"]["mace"],
                run["results"]["ours"],
            )
            line = (
                f"{len(atoms):>6} {1e3 * mace_t:>10.1f} {1e3 * ours_t:>10.1f} "
                f"{ours_t / mace_t:>6.3f}  {abs(e_ours - e_ref):>12.2e}  "
                f"{np.abs(f_ours - f_ref).max():>14.2e}"
            )
            if args.symmetrix:
                sym_t = statistics.median(run["times"]["symmetrix"])
                e_sym, f_sym = run["results"]["symmetrix"]
                line += (
                    f"  {1e3 * sym_t:>14.1f} {ours_t / sym_t:>8.1f}  "
                    f"{abs(e_sym - e_ours):>10.1e} {np.abs(f_sym - f_ours).max():>7.1e}"
                )
            print(line, flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
