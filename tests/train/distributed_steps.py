"""Train a small MACE with the package's Trainer and save the final weights.

Started by tests/train/test_distributed.py as one plain process or under
``torch.distributed.run`` (several processes): the Trainer finds the launcher in the
environment. Rank 0 saves the weights after training. ``--fail-rank`` makes one rank
raise in its second epoch, to check that the others stop instead of waiting.

    python distributed_steps.py DATA OUT --batch-size B [--epochs N] [--fail-rank R]
"""

import argparse
import copy
import os
import sys
from pathlib import Path

import torch
from metatrain.utils.architectures import get_default_hypers
from metatrain.utils.data import DatasetInfo, get_atomic_types, get_dataset
from metatrain.utils.omegaconf import expand_dataset_config
from omegaconf import OmegaConf


# tests/, for the helpers package
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from helpers.datasets import ALLOY_TARGETS  # noqa: E402
from metatrain_mace import MetaMACE, Trainer  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("data")
    parser.add_argument("out")
    parser.add_argument("--batch-size", type=int, required=True)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--fail-rank", type=int, default=None)
    args = parser.parse_args()

    torch.manual_seed(0)
    dataset, targets, _ = get_dataset(
        expand_dataset_config(
            OmegaConf.create(
                {
                    "systems": {"read_from": args.data, "length_unit": "angstrom"},
                    "targets": ALLOY_TARGETS,
                }
            )
        )[0]
    )
    info = DatasetInfo(
        length_unit="angstrom", atomic_types=get_atomic_types(dataset), targets=targets
    )
    hypers = get_default_hypers("experimental.mace")
    model_hypers = hypers["model"]
    model_hypers.update(
        {"r_max": 4.5, "hidden_irreps": "8x0e + 8x1o", "max_ell": 2, "correlation": 2}
    )
    training = copy.deepcopy(hypers["training"])
    training.update(
        {
            "batch_size": args.batch_size,
            "num_epochs": args.epochs,
            "num_workers": 0,
            "learning_rate": 0.01,
            "checkpoint_interval": 1000,
            "loss": {
                "energy": {
                    "type": "mse",
                    "weight": 1.0,
                    "reduction": "mean",
                    "gradients": {
                        "positions": {
                            "type": "mse",
                            "weight": 10.0,
                            "reduction": "mean",
                        },
                        "strain": {"type": "mse", "weight": 1.0, "reduction": "mean"},
                    },
                }
            },
        }
    )
    trainer = Trainer(training)
    rank = int(os.environ.get("RANK", "0"))
    if args.fail_rank == rank:
        from metatrain_mace.train.epoch import EpochRunner

        run_epoch = EpochRunner.run
        calls = []

        def failing_epoch(self, *a, **k):
            calls.append(None)
            if len(calls) == 3:  # the training pass of the second epoch
                raise RuntimeError(f"injected failure on rank {rank}")
            return run_epoch(self, *a, **k)

        EpochRunner.run = failing_epoch  # type: ignore[method-assign]

    # the validation errors of every epoch, as the trainer logs them
    validations = []
    validate = Trainer._validate

    def recording_validate(self, *a, **k):
        val_loss, logged = validate(self, *a, **k)
        validations.append({name: float(value) for name, value in logged[-1].items()})
        return val_loss, logged

    Trainer._validate = recording_validate  # type: ignore[method-assign]

    model = MetaMACE(model_hypers, info)
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
    checkpoints = Path(args.out).parent / f"checkpoints-{rank}"
    checkpoints.mkdir(exist_ok=True)
    trainer.train(
        model,
        torch.float64,
        [torch.device("cpu")],
        [dataset],
        [dataset],
        str(checkpoints),
    )
    if rank == 0:
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        torch.save(
            {
                "initial": initial,
                "state": state,
                "best_metric": trainer.state.best_metric,
                "best_epoch": trainer.state.best_epoch,
                "validation": validations[-1],
            },
            args.out,
        )


if __name__ == "__main__":
    main()
