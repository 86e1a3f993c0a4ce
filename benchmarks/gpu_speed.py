#!/usr/bin/env python
"""cuEquivariance against e3nn, ours against mace-torch's calculator, on a GPU.

On the same weights (a MACE-MP-0-medium-sized ScaleShiftMACE with random weights,
or ``--model``), for float32 and float64 and carbon diamond supercells of 64 to 4096
atoms, times

- inference (energy and forces) of ours on e3nn and on cuEquivariance (the
  ``MetaMACE`` model, ``enable_cueq`` on the trunk) and of mace-torch's
  ``MACECalculator`` with and without ``enable_cueq``;
- one training step (energy and forces loss, backward, Adam step) of ours on both
  backends;

alternating the candidates on the same structures, and prints the median times and
the ratios: ours(cuEq) / MACE(cuEq) (target <= 1.0) and e3nn / cuEq (target >= 3).
It also prints the largest energy and force differences between the candidates.
Without a GPU it runs on the CPU (``--device cpu``) only as a check that it works:
cuEquivariance's CPU path is a slow fallback. Run from the repository root::

    python benchmarks/gpu_speed.py                       # on a CUDA machine
    python benchmarks/gpu_speed.py --device cpu --sizes 1 --repeats 1 --dtypes float64
"""

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List


sys.path.insert(0, str(Path(__file__).parent))


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _timed(function: Callable[[], object], device: str) -> float:
    _sync(device)
    start = time.perf_counter()
    function()
    _sync(device)
    return time.perf_counter() - start


def main(argv: List[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="MACE model file (default: build one)")
    parser.add_argument("--sizes", default="2,4,6,8", help="supercell repeats n")
    parser.add_argument("--dtypes", default="float32,float64")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args(argv)

    import torch
    from ase_speed import build_model_file, supercell
    from mace.calculators import MACECalculator
    from metatrain.utils.data.target_info import get_energy_target_info

    from metatrain_mace.tools.export import mace_file_to_model
    from metatrain_mace.trunk.graph import systems_for_model

    device = args.device
    with tempfile.TemporaryDirectory() as tmp:
        model_file = Path(args.model) if args.model else Path(tmp) / "mace.model"
        if not args.model:
            print("building a MACE-MP-0-medium-sized model file (random weights)...")
            build_model_file(model_file)
        for dtype_name in args.dtypes.split(","):
            dtype = getattr(torch, dtype_name)
            torch.set_default_dtype(dtype)
            e3nn = mace_file_to_model(str(model_file), dtype=dtype_name)
            on_cueq = copy.deepcopy(e3nn)
            on_cueq.set_backend(True)
            ours = {"ours e3nn": e3nn.to(device), "ours cueq": on_cueq.to(device)}
            info = get_energy_target_info(
                "energy", {"unit": "eV"}, add_position_gradients=True
            )
            theirs = {
                "mace e3nn": MACECalculator(
                    model_paths=str(model_file),
                    device=device,
                    default_dtype=dtype_name,
                ),
                "mace cueq": MACECalculator(
                    model_paths=str(model_file),
                    device=device,
                    default_dtype=dtype_name,
                    enable_cueq=True,
                ),
            }
            for n in [int(x) for x in args.sizes.split(",")]:
                atoms = supercell(n, seed=n)
                systems = [
                    s.to(device=device) for s in systems_for_model(e3nn, [atoms], dtype)
                ]
                median, results = _measure(
                    atoms, systems, ours, theirs, info, device, args.repeats
                )
                print(f"\n{dtype_name}, {len(atoms)} atoms on {device}")
                for name, value in median.items():
                    print(f"  {name:28s} {1000 * value:9.1f} ms")
                cueq_ratio = median["ours cueq"] / median["mace cueq"]
                backend_ratio = median["ours e3nn"] / median["ours cueq"]
                step_ratio = (
                    median["ours e3nn train step"] / median["ours cueq train step"]
                )
                print(f"  ours cueq / mace cueq: {cueq_ratio:.2f} (target <= 1.0)")
                print(f"  ours e3nn / ours cueq: {backend_ratio:.2f} (target >= 3)")
                print(f"  train step e3nn / cueq: {step_ratio:.2f}")
                energy, forces = results["mace e3nn"]
                for name, (e, f) in results.items():
                    print(
                        f"  {name:28s} |dE| {abs(e - energy):.1e} eV, "
                        f"max |dF| {float((f - forces).abs().max()):.1e}"
                    )


def _measure(atoms, systems, ours, theirs, info, device, repeats):
    """Median times of every candidate, and the energy and dE/dx of each."""
    import torch
    from metatrain.utils.evaluate_model import evaluate_model

    results: Dict[str, tuple] = {}

    def ours_call(model, name):
        out = evaluate_model(model, systems, {"energy": info}, is_training=False)[
            "energy"
        ].block()
        results[name] = (
            float(out.values.detach().sum()),
            out.gradient("positions").values.detach().reshape(-1, 3).cpu(),
        )

    def ours_step(model, optimizer):
        out = evaluate_model(model, systems, {"energy": info}, is_training=True)[
            "energy"
        ].block()
        loss = (out.values**2).sum() + (out.gradient("positions").values ** 2).sum()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    def theirs_call(calculator, name):
        # ASE calculators cache the last result: forget it, so every call computes
        calculator.reset()
        trial = atoms.copy()
        trial.calc = calculator
        results[name] = (
            trial.get_potential_energy(),
            -torch.as_tensor(trial.get_forces()),
        )

    candidates = {}
    for name, model in ours.items():
        candidates[name] = lambda m=model, k=name: ours_call(m, k)
        # a copy that trains (tiny steps), made before the timing
        trainee = copy.deepcopy(model).train()
        optimizer = torch.optim.Adam(trainee.parameters(), lr=1e-9)
        candidates[f"{name} train step"] = lambda m=trainee, o=optimizer: ours_step(
            m, o
        )
    for name, calculator in theirs.items():
        candidates[name] = lambda c=calculator, k=name: theirs_call(c, k)
    times: Dict[str, List[float]] = {}
    for repeat in range(repeats + 1):
        order = list(candidates.items())
        if repeat % 2:
            order.reverse()
        for name, call in order:
            elapsed = _timed(call, device)
            if repeat > 0:  # the first round is warm-up
                times.setdefault(name, []).append(elapsed)
    return {k: statistics.median(v) for k, v in times.items()}, results


if __name__ == "__main__":
    main(sys.argv[1:])
