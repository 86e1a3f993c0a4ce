"""Data-parallel training on torch.distributed: launchers, process group, sharing.

Three ways to start several training processes are recognised:

- ``torchrun`` (or any launcher that sets ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``
  and ``MASTER_PORT`` itself, and usually ``LOCAL_RANK``);
- SLURM with more than one task (``srun mtt train ...``): metatrain's
  :class:`~metatrain.utils.distributed.slurm.DistributedEnvironment` turns the SLURM
  variables into the ones above, with ``distributed_port`` as the port;
- nothing: one process, no process group.

The backend follows the device: NCCL on CUDA (one GPU per process, chosen by the
local rank), gloo on CPU. Set-up work that must agree on every rank (baselines,
scales, the model's initial weights) is done once on rank 0 and broadcast.

Collective calls give up after torch's default timeout (10 minutes with NCCL), so
that a rank that died does not leave the others waiting for hours; only the
broadcast after the set-up, which waits for rank 0 to fit the baselines on the
whole training set, goes through a CPU (gloo) group with a longer timeout.
"""

import datetime
import inspect
import logging
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from metatrain.utils.distributed.distributed_data_parallel import (
    DistributedDataParallel,
)
from metatrain.utils.distributed.slurm import DistributedEnvironment, is_slurm


# rank 0 alone fits the baselines while the others wait for the result: allow for
# large datasets before that broadcast gives up
SETUP_TIMEOUT = datetime.timedelta(hours=2)


@dataclass
class Context:
    """Where this process stands in the run."""

    world_size: int = 1
    rank: int = 0
    device: torch.device = torch.device("cpu")
    launcher: Optional[str] = None  # "torchrun", "slurm" or None
    setup_group: Any = None  # CPU group with a long timeout, for broadcast_object

    @property
    def enabled(self) -> bool:
        return self.launcher is not None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def detect_launcher() -> Optional[str]:
    """The launcher that started several processes, or None for a single one."""
    if "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return "torchrun"
    if is_slurm() and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        return "slurm"
    return None


def resolve(distributed: Optional[bool]) -> Optional[str]:
    """Apply the ``distributed`` hyper to the launcher found in the environment.

    Unset (metatrain's convention): distributed exactly when a launcher started
    several processes. ``true`` without such a launcher and ``false`` with one are
    refused: the first cannot work, the second would train the same model once per
    process.
    """
    launcher = detect_launcher()
    if distributed is True and launcher is None:
        raise ValueError(
            "'distributed: true' is set, but this process was not started by a "
            "multi-process launcher: start the training with 'torchrun "
            "--nproc_per_node N mtt train options.yaml' or 'srun --ntasks N mtt "
            "train options.yaml' (and remove 'distributed', which is detected "
            "automatically)"
        )
    if distributed is False and launcher is not None:
        raise ValueError(
            f"'distributed: false' is set, but {launcher} started "
            f"{os.environ.get('WORLD_SIZE') or os.environ.get('SLURM_NTASKS')} "
            "processes: each would train its own copy of the same model. Remove "
            "'distributed: false' or start a single process."
        )
    return launcher


def setup(distributed: Optional[bool], port: int, device: torch.device) -> Context:
    """Join the process group when a launcher started several processes.

    :param distributed: the ``distributed`` hyper (None when unset).
    :param port: the port for SLURM launches (torchrun chooses its own).
    :param device: the device metatrain picked; CUDA means NCCL and one GPU per
        process, anything else gloo on CPU.
    """
    launcher = resolve(distributed)
    if launcher is None:
        return Context(device=device)
    if launcher == "slurm":
        DistributedEnvironment(port)  # sets MASTER_*, WORLD_SIZE, RANK, LOCAL_RANK
    rank = int(os.environ["RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
        backend = "nccl"
    elif device.type == "cpu":
        backend = "gloo"
    else:
        raise ValueError(
            f"distributed training runs on CUDA (NCCL) or CPU (gloo), not on "
            f"'{device.type}': set 'device: cuda' or 'device: cpu'"
        )
    if not dist.is_initialized():
        kwargs: dict = {"backend": backend}
        if backend == "nccl":
            kwargs["device_id"] = device
        dist.init_process_group(**kwargs)
    setup_group = dist.new_group(backend="gloo", timeout=SETUP_TIMEOUT)
    logging.info(
        f"Distributed training on {world_size} processes (launcher {launcher}, "
        f"backend {backend}, {torch.get_num_threads()} threads per process); "
        f"this is rank {rank}, on {device}"
    )
    return Context(world_size, rank, device, launcher, setup_group)


def data_parallel(model: torch.nn.Module, context: Context) -> torch.nn.Module:
    """``model`` wrapped in metatrain's DistributedDataParallel (which averages the
    gradients over the ranks in the backward pass), or ``model`` itself."""
    if not context.enabled:
        return model
    # buffers were broadcast once with the state (broadcast_state): no need to
    # send them again before every forward pass (the keyword changed in torch 2.13)
    parameters = inspect.signature(torch.nn.parallel.DistributedDataParallel).parameters
    no_buffer_sync = (
        {"forward_sync_buffers": False}
        if "forward_sync_buffers" in parameters
        else {"broadcast_buffers": False}
    )
    return DistributedDataParallel(
        model,
        device_ids=[context.device] if context.device.type == "cuda" else None,
        **no_buffer_sync,
    )


def teardown(context: Context) -> None:
    """Leave the process group (every rank, also after an error)."""
    if context.enabled and dist.is_initialized():
        dist.destroy_process_group()


def barrier(context: Context) -> None:
    if context.enabled:
        dist.barrier()


def broadcast_object(value: Any, context: Context) -> Any:
    """Rank 0's ``value`` on every rank."""
    if not context.enabled:
        return value
    holder: List[Any] = [value if context.is_main else None]
    dist.broadcast_object_list(
        holder, src=0, group=context.setup_group, device=torch.device("cpu")
    )
    return holder[0]


def broadcast_state(model: Any, context: Context) -> None:
    """Give every rank rank 0's weights, baselines and scales.

    The tensors travel as one CPU state dict; the metatensor maps that the
    composition baseline and the scaler keep beside their buffers are rebuilt
    from them, as when a checkpoint is loaded.
    """
    if not context.enabled:
        return
    state = None
    if context.is_main:
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    state = broadcast_object(state, context)
    if not context.is_main:
        model.load_state_dict(state)
        if float(model.trunk.avg_num_neighbors) > 0:
            model.set_avg_num_neighbors(float(model.trunk.avg_num_neighbors))
        model.additive_models[0].sync_tensor_maps()
        model.scaler.sync_tensor_maps()


def all_reduce_sum(value: float, context: Context) -> float:
    """The sum of ``value`` over all ranks."""
    if not context.enabled:
        return value
    tensor = torch.tensor(
        float(value), dtype=torch.float64, device=_collective_device(context)
    )
    dist.all_reduce(tensor)
    return float(tensor.item())


def sum_over_ranks(sums: Dict[str, Tuple[float, int]], device: torch.device) -> None:
    """Replace each ``(total, count)`` of ``sums`` by its sum over all ranks.

    metatrain's accumulators reduce each number separately, in float32; this sends
    all of them in one float64 tensor (exact for counts below 2**53). Keys that
    only some ranks have count as ``(0.0, 0)`` on the others.
    """
    gathered: List[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, sorted(sums))
    keys = sorted(set().union(*gathered))
    values = torch.tensor(
        [[float(v) for v in sums.get(key, (0.0, 0))] for key in keys],
        dtype=torch.float64,
        device=device if device.type == "cuda" else torch.device("cpu"),
    ).reshape(len(keys), 2)
    dist.all_reduce(values)
    for key, (total, count) in zip(keys, values.tolist(), strict=True):
        sums[key] = (total, int(count))


def shard(dataset: Any, context: Context) -> Any:
    """This rank's share of ``dataset`` for evaluation: every ``world_size``-th
    structure, none repeated (all ranks' shards together are the dataset)."""
    if not context.enabled:
        return dataset
    indices = list(range(context.rank, len(dataset), context.world_size))
    return torch.utils.data.Subset(dataset, indices)


def check_shares(datasets: List[Any], context: Context) -> None:
    """Refuse a run whose processes would get no training structure, before any
    training; warn about sets too small to give each process one.

    Each process trains on an equal share of whole structures of every set (see
    :func:`training_samplers`): a set of fewer structures than processes gives
    none, and with all sets so small every process would log a zero loss and
    export an untrained model."""
    if not context.enabled:
        return
    processes = context.world_size
    sizes = [len(dataset) for dataset in datasets]
    if sum(n // processes for n in sizes) == 0:
        raise ValueError(
            f"{processes} training processes for {sum(sizes)} training structures "
            f"(per training set: {sizes}): each process trains on an equal share "
            "of whole structures, and this leaves every process without any. "
            f"Start at most {max(sizes, default=0)} processes (torchrun "
            "--nproc-per-node, or the number of SLURM tasks), or add training "
            "structures."
        )
    for d, n in enumerate(sizes):
        if 0 < n < processes:
            logging.warning(
                f"training set {d} has {n} structures for {processes} processes: "
                "each process trains on an equal share of whole structures, so "
                "this set is left out of training. Add structures to it or start "
                "fewer processes."
            )


def training_samplers(datasets: List[Any], context: Context) -> List[Any]:
    """Shuffling samplers giving each rank the same number of structures per
    epoch (``drop_last``), so that every rank takes the same number of steps."""
    if not context.enabled:
        return [None] * len(datasets)
    return [
        torch.utils.data.DistributedSampler(
            dataset,
            num_replicas=context.world_size,
            rank=context.rank,
            shuffle=True,
            drop_last=True,
        )
        for dataset in datasets
    ]


def _collective_device(context: Context) -> torch.device:
    # NCCL only moves CUDA tensors
    return context.device if context.device.type == "cuda" else torch.device("cpu")
