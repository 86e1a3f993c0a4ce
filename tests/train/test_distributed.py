"""Distributed data-parallel training on CPU (gloo, 2 processes).

The processes are real: started by ``torch.distributed.run`` (torchrun), or by hand
with the variables SLURM sets for each task. Each uses one thread, so that two of
them share this machine's cores.
"""

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional

import ase.io
import numpy as np
import pytest
import torch
import yaml
from metatomic_ase import MetatomicCalculator

import metatrain_mace_hook
from helpers.datasets import ALLOY_TARGETS
from helpers.options import train_options
from metatrain_mace.train import distributed


HERE = Path(__file__).parent
BIN = Path(sys.executable).parent
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
LAUNCH_VARIABLES = [
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
    "SLURM_JOB_ID",
    "SLURM_PROCID",
    "SLURM_NTASKS",
    "SLURM_LOCALID",
    "SLURM_JOB_NODELIST",
]


def environment(**variables: str) -> Dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARIABLES}
    env.pop("METATRAIN_MACE_DISABLE", None)
    env["OMP_NUM_THREADS"] = "1"
    env.update(variables)
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(command: List[str], cwd: Path, timeout: float = 600, **env: str):
    result = subprocess.run(
        command,
        cwd=cwd,
        env=environment(**env),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    return result


def run_by_hand(command: List[str], cwd: Path, variables: List[Dict[str, str]]):
    """Start one process per entry of ``variables`` (no launcher) and wait for all;
    none may take more than 5 minutes."""
    processes = [
        subprocess.Popen(
            command,
            cwd=cwd,
            env=environment(**v),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for v in variables
    ]
    outputs = []
    try:
        for process in processes:
            outputs.append(process.communicate(timeout=300)[0])
    finally:
        for process in processes:
            process.kill()
    return [p.returncode for p in processes], outputs


def slurm_variables(n: int) -> List[Dict[str, str]]:
    return [
        {
            "SLURM_JOB_ID": "1234",
            "SLURM_PROCID": str(rank),
            "SLURM_NTASKS": str(n),
            "SLURM_LOCALID": str(rank),
            "SLURM_JOB_NODELIST": "localhost",
        }
        for rank in range(n)
    ]


# --- launchers and the main process -------------------------------------------------


def clear_launch(monkeypatch) -> None:
    for name in LAUNCH_VARIABLES:
        monkeypatch.delenv(name, raising=False)


def test_launcher_detection(monkeypatch) -> None:
    clear_launch(monkeypatch)
    assert distributed.resolve(None) is None
    assert distributed.resolve(False) is None
    with pytest.raises(ValueError, match="not started by a multi-process launcher"):
        distributed.resolve(True)

    for name, value in slurm_variables(2)[1].items():
        monkeypatch.setenv(name, value)
    assert distributed.resolve(None) == "slurm"
    assert distributed.resolve(True) == "slurm"
    with pytest.raises(ValueError, match="'distributed: false' is set, but slurm"):
        distributed.resolve(False)
    monkeypatch.setenv("SLURM_NTASKS", "1")
    assert distributed.resolve(None) is None

    # torchrun inside a one-task SLURM job: torchrun's variables decide
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert distributed.resolve(None) == "torchrun"
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert distributed.resolve(None) is None


def test_main_process_follows_rank(monkeypatch) -> None:
    """Under torchrun, metatrain's is_main_process (wrapped by the hook) is true on
    rank 0 only, also inside a SLURM job whose task id is 0 for every process."""
    from metatrain.utils.distributed.logging import is_main_process

    assert hasattr(is_main_process, "__wrapped__")
    clear_launch(monkeypatch)
    assert is_main_process()
    monkeypatch.setenv("SLURM_JOB_ID", "1")
    monkeypatch.setenv("SLURM_PROCID", "0")
    for rank, expected in [("0", True), ("1", False), ("3", False)]:
        monkeypatch.setenv("RANK", rank)
        assert is_main_process() is expected
    monkeypatch.delenv("RANK")
    monkeypatch.setenv("SLURM_PROCID", "1")
    assert not is_main_process()
    # the wrapping is the hook's own, applied once
    wrapped = metatrain_mace_hook.is_main_process_with_rank(lambda: True)
    monkeypatch.setenv("RANK", "2")
    assert wrapped() is False


def test_validation_shards_cover_the_dataset_once() -> None:
    data = list(range(11))
    shards = [
        list(distributed.shard(data, distributed.Context(3, rank, launcher="x")))
        for rank in range(3)
    ]
    assert sorted(sum(shards, [])) == data
    assert [len(s) for s in shards] == [4, 4, 3]
    assert distributed.shard(data, distributed.Context()) is data


# --- the same steps on 1 and 2 processes --------------------------------------------


@pytest.fixture(scope="module")
def four_structures(tmp_path_factory) -> Path:
    """4 Cu-Au cells of 8 atoms (the same number of atoms: the mean loss over the
    union batch is then the mean of the two ranks' mean losses)."""
    from helpers.datasets import make_alloy

    path = tmp_path_factory.mktemp("four") / "four.xyz"
    make_alloy(path, n_structures=4, seed=3)
    return path


def compare_states(one: dict, two: dict) -> float:
    """Largest difference of the floating-point tensors; integer tensors equal."""
    assert one.keys() == two.keys()
    largest = 0.0
    for name, value in one.items():
        if value.is_floating_point():
            if value.numel() > 0:
                largest = max(largest, float((value - two[name]).abs().max()))
        elif name.endswith("type_to_index"):
            # metatrain fills only the entries of the model's atomic types
            assert torch.equal(value[[29, 79]], two[name][[29, 79]]), name
        else:
            assert torch.equal(value, two[name]), name
    return largest


@pytest.mark.slow
def test_two_ranks_take_the_steps_of_one_rank_on_the_union_batch(
    four_structures: Path, tmp_path: Path
) -> None:
    """Two optimizer steps (two epochs of one step): 2 ranks with 2 structures each
    give the weights of 1 process with the batch of all 4."""
    script = str(HERE / "distributed_steps.py")
    data = str(four_structures)
    single = run(
        [sys.executable, script, data, str(tmp_path / "one.pt"), "--batch-size", "4"],
        tmp_path,
    )
    assert single.returncode == 0, single.stderr[-3000:]
    double = run(
        [
            *TORCHRUN,
            "--nproc_per_node",
            "2",
            script,
            data,
            str(tmp_path / "two.pt"),
            "--batch-size",
            "2",
        ],
        tmp_path,
    )
    assert double.returncode == 0, double.stderr[-3000:]

    one = torch.load(tmp_path / "one.pt", weights_only=True)
    two = torch.load(tmp_path / "two.pt", weights_only=True)
    largest = compare_states(one["state"], two["state"])
    # measured: 3.3e-15
    assert largest < 1e-12, largest
    # the steps did change the weights
    changes = [
        float((one["state"][name] - value).abs().max())
        for name, value in one["initial"].items()
        if name.startswith("trunk.mace.interactions")
        and value.is_floating_point()
        and value.numel() > 0
    ]
    assert max(changes) > 1e-4
    # validation errors are reduced over both ranks' shares of the data
    errors = [name for name in one["validation"] if name != "loss"]
    assert any("MAE" in name for name in errors), errors
    for name in errors:
        assert two["validation"][name] == pytest.approx(
            one["validation"][name], rel=1e-10
        ), name
    # the loss is a sum over batches (metatrain's convention) and over ranks: the
    # two ranks' batches of 2 add up to twice the one batch of 4 (all cells have
    # 8 atoms); the best model (by the loss) is chosen alike
    assert two["validation"]["loss"] == pytest.approx(
        2 * one["validation"]["loss"], rel=1e-10
    )
    assert two["best_metric"] == pytest.approx(2 * one["best_metric"], rel=1e-10)
    assert one["best_epoch"] == two["best_epoch"]
    # only rank 0 wrote the baselines' checkpoints
    assert (tmp_path / "checkpoints-0" / "composition_model.ckpt").exists()
    assert not list((tmp_path / "checkpoints-1").iterdir())


@pytest.mark.slow
def test_an_error_on_one_rank_stops_every_rank(
    four_structures: Path, tmp_path: Path
) -> None:
    """Rank 1 fails in its second epoch while rank 0 waits for its gradients: both
    processes end (no launcher kills them), with the error of rank 1."""
    port = str(free_port())
    codes, outputs = run_by_hand(
        [
            sys.executable,
            str(HERE / "distributed_steps.py"),
            str(four_structures),
            str(tmp_path / "out.pt"),
            "--batch-size",
            "2",
            "--fail-rank",
            "1",
        ],
        tmp_path,
        [
            {
                "RANK": str(rank),
                "WORLD_SIZE": "2",
                "LOCAL_RANK": str(rank),
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": port,
            }
            for rank in range(2)
        ],
    )
    assert codes[0] != 0 and codes[1] != 0, codes
    assert "injected failure on rank 1" in outputs[1]
    assert "Connection closed by peer" in outputs[0], outputs[0][-3000:]
    assert not (tmp_path / "out.pt").exists()


# --- mtt train with torchrun and under SLURM ----------------------------------------


def write_options(
    directory: Path, epochs: int, model_changes: Optional[dict] = None, **training
) -> Path:
    model = {
        "r_max": 4.5,
        "hidden_irreps": "8x0e + 8x1o",
        "max_ell": 2,
        "correlation": 2,
        **(model_changes or {}),
    }
    training = {"batch_size": 4, "checkpoint_interval": 2, **training}
    options = train_options("alloy.xyz", model, num_epochs=epochs, **training)
    path = directory / f"options-{epochs}.yaml"
    path.write_text(yaml.safe_dump(options))
    return path


def check_run(directory: Path, log: str, epochs: int) -> None:
    """One output folder, one final checkpoint and one exported model that
    evaluates; the log names the number of processes and every epoch once."""
    runs = list(directory.glob("outputs/*/*"))
    assert len(runs) == 1, runs
    train_log = (runs[0] / "train.log").read_text()
    assert "Distributed training on 2 processes" in train_log
    assert "Training on 2 processes" in train_log
    for epoch in range(epochs):
        assert train_log.count(f"Epoch: {epoch:4d}") == 1, epoch
    assert (directory / "model.ckpt").exists()
    assert (directory / "model.pt").exists()
    assert sorted(p.name for p in runs[0].glob("*.ckpt")) == sorted(
        ["composition_model.ckpt", "scaler.ckpt", "model.ckpt", "model_latest.ckpt"]
        + [f"model_{e}.ckpt" for e in range(0, epochs, 2)]
    )
    assert log.count("Exported model") <= 1


def evaluate(directory: Path) -> None:
    (directory / "eval.yaml").write_text(
        yaml.safe_dump(
            {
                "systems": {"read_from": "alloy.xyz", "length_unit": "angstrom"},
                "targets": ALLOY_TARGETS,
            }
        )
    )
    result = run(
        [str(BIN / "mtt"), "eval", "model.pt", "eval.yaml", "-o", "pred.xyz"],
        directory,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    predicted = ase.io.read(directory / "pred.xyz", ":")
    assert len(predicted) == 16
    # the exported model evaluates through metatomic's ASE calculator as well
    atoms = ase.io.read(directory / "alloy.xyz", "0")
    atoms.calc = MetatomicCalculator(str(directory / "model.pt"))
    assert np.isfinite(atoms.get_potential_energy())


@pytest.fixture
def alloy_dir(tmp_path: Path) -> Path:
    from helpers.datasets import make_alloy

    # 16 cells: 12 to train on, 6 per process, and 4 to validate on
    make_alloy(tmp_path / "alloy.xyz", n_structures=16, seed=1)
    return tmp_path


@pytest.mark.slow
def test_mtt_train_with_torchrun_and_restart(alloy_dir: Path) -> None:
    mtt = str(BIN / "mtt")
    options = write_options(alloy_dir, epochs=3)
    result = run(
        [*TORCHRUN, "--nproc_per_node", "2", mtt, "train", str(options)], alloy_dir
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-5000:]
    check_run(alloy_dir, output, epochs=3)
    evaluate(alloy_dir)

    # restart the distributed run for two more epochs
    options = write_options(alloy_dir, epochs=5)
    result = run(
        [
            *TORCHRUN,
            "--nproc_per_node",
            "2",
            mtt,
            "train",
            str(options),
            "--restart",
            "model.ckpt",
        ],
        alloy_dir,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-5000:]
    runs = sorted(alloy_dir.glob("outputs/*/*"))
    assert len(runs) == 2
    restart_log = (runs[-1] / "train.log").read_text()
    assert "Restarting training from 'model.ckpt'" in restart_log
    assert "Distributed training on 2 processes" in restart_log
    assert "Epoch:    3" in restart_log and "Epoch:    4" in restart_log
    assert "Epoch:    2" not in restart_log
    checkpoint = torch.load(alloy_dir / "model.ckpt", weights_only=False)
    assert checkpoint["epoch"] == 4


@pytest.mark.slow
def test_long_range_model_trains_on_two_processes(alloy_dir: Path) -> None:
    """The long-range energy (Ewald sums of every structure in training) trains
    with data parallelism like the rest of the model."""
    options = write_options(alloy_dir, epochs=2, model_changes=LONG_RANGE)
    result = run(
        [*TORCHRUN, "--nproc_per_node", "2", str(BIN / "mtt"), "train", str(options)],
        alloy_dir,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-5000:]
    check_run(alloy_dir, output, epochs=2)
    evaluate(alloy_dir)
    checkpoint = torch.load(alloy_dir / "model.ckpt", weights_only=False)
    assert checkpoint["model_data"]["model_hypers"]["long_range"]["enable"]
    assert any(k.startswith("long_range.") for k in checkpoint["model_state_dict"])


LONG_RANGE = {"long_range": {"enable": True}}


@pytest.mark.slow
def test_mtt_train_under_slurm_with_max_atoms(alloy_dir: Path) -> None:
    """Two processes started as SLURM starts the tasks of ``srun --ntasks 2``, with
    batches packed by atom count."""
    options = write_options(
        alloy_dir,
        epochs=3,
        max_atoms_per_batch=24,
        distributed_port=free_port(),
    )
    codes, outputs = run_by_hand(
        [str(BIN / "mtt"), "train", str(options)], alloy_dir, slurm_variables(2)
    )
    assert codes == [0, 0], outputs[0][-5000:] + outputs[1][-5000:]
    check_run(alloy_dir, outputs[0] + outputs[1], epochs=3)
    assert "launcher slurm, backend gloo" in outputs[0]
    # the second task logs nothing but errors
    assert "Epoch:" not in outputs[1]
    evaluate(alloy_dir)


def test_cuda_processes_use_nccl_and_the_local_gpu(monkeypatch) -> None:
    """The GPU set-up (NCCL, one GPU per process chosen by the local rank) with
    torch's CUDA and process-group calls recorded instead of run (no GPU here)."""
    clear_launch(monkeypatch)
    calls = {}
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.update(device=d))
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(
        distributed.dist, "init_process_group", lambda **kw: calls.update(init=kw)
    )
    monkeypatch.setattr(
        distributed.dist, "new_group", lambda **kw: calls.update(group=kw) or "group"
    )
    for name, value in {"RANK": "6", "WORLD_SIZE": "8", "LOCAL_RANK": "6"}.items():
        monkeypatch.setenv(name, value)
    context = distributed.setup(None, 12345, torch.device("cuda"))
    assert context.device == torch.device("cuda", 2)
    assert calls["device"] == torch.device("cuda", 2)
    assert calls["init"] == {"backend": "nccl", "device_id": torch.device("cuda", 2)}
    assert calls["group"]["backend"] == "gloo"
    assert (context.rank, context.world_size, context.launcher) == (6, 8, "torchrun")
    assert not context.is_main and context.setup_group == "group"

    with pytest.raises(ValueError, match="not on 'mps'"):
        distributed.setup(None, 12345, torch.device("mps"))


def test_more_processes_than_training_structures_is_refused(caplog) -> None:
    """Each process trains on an equal share of whole structures: with more
    processes than structures every process would train on nothing."""
    from metatrain_mace.train.distributed import Context, check_shares

    context = Context(world_size=4, rank=1, launcher="torchrun")
    with pytest.raises(
        ValueError,
        match=r"4 training processes for 5 training structures \(per training set: "
        r"\[3, 2\]\).*Start at most 3 processes",
    ):
        check_shares([list(range(3)), list(range(2))], context)
    # one set large enough: the small one is left out, with a warning
    check_shares([list(range(8)), list(range(2))], context)
    assert "training set 1 has 2 structures for 4 processes" in caplog.text
    # one process: nothing to check
    check_shares([[]], Context())


@pytest.mark.slow
def test_torchrun_with_more_processes_than_structures(tmp_path: Path) -> None:
    """Two processes for one training structure: every process would train on
    nothing and export an untrained model; refused before training."""
    from helpers.datasets import make_alloy

    make_alloy(tmp_path / "alloy.xyz", n_structures=2, seed=1)
    options = yaml.safe_load(write_options(tmp_path, epochs=2).read_text())
    options["validation_set"] = 0.5
    path = tmp_path / "options.yaml"
    path.write_text(yaml.safe_dump(options))
    result = run(
        [*TORCHRUN, "--nproc_per_node", "2", str(BIN / "mtt"), "train", str(path)],
        tmp_path,
    )
    output = result.stdout + result.stderr
    assert result.returncode != 0, output[-3000:]
    assert (
        "2 training processes for 1 training structures (per training set: [1])"
        in output
    ), output[-3000:]
    assert "Start at most 1 processes" in output
    assert "Starting training\n" not in output and "Epoch:" not in output
    assert not (tmp_path / "model.pt").exists()
