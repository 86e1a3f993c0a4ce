"""Checks of the training and validation data, before any training starts.

Bad values otherwise surface deep inside training as NaN losses, broadcasting
errors of the composition fit or a ``ZeroDivisionError`` of the metric logger. Each
check here names the structure by its file and its index in that file (0-based,
the order in which ASE reads it) and says what to do.

The rules:

- the values of every target (energies, dipoles, ...) must be finite;
- gradients (forces, stress, virial) may hold NaN, which marks a value as missing
  (the loss skips it), but never an infinity;
- a per-atom target has one row per atom of its structure, with the shape its
  ``targets`` section declares;
- no two atoms of a structure are closer than :data:`MIN_DISTANCE` (a pair at the
  same position makes the edge direction, and so the whole model output, NaN).
"""

import logging
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch
import yaml
from metatensor.torch import TensorMap
from metatomic.torch import System
from vesin import NeighborList


MIN_DISTANCE = 0.1
"""Shortest distance allowed between two atoms of a training or validation
structure, in Å (the shortest chemical bond, H-H, is 0.74 Å)."""


class StructureNames:
    """Names structures of the training and validation sets by file and index.

    The files come from ``options_restart.yaml``, which ``mtt train`` writes into
    the checkpoint folder before training; without it (a trainer called from
    Python) structures are named by set and position only."""

    def __init__(self, checkpoint_dir: Optional[str] = None) -> None:
        self.files: Dict[str, List[str]] = {"training": [], "validation": []}
        path = None if checkpoint_dir is None else Path(checkpoint_dir)
        if path is None or not (path / "options_restart.yaml").is_file():
            return
        try:
            options = yaml.safe_load((path / "options_restart.yaml").read_text())
        except (OSError, yaml.YAMLError):
            return
        self.files["training"] = _files(options.get("training_set"))
        validation = options.get("validation_set")
        # a fraction: validation set d is split off training set d
        self.files["validation"] = (
            self.files["training"]
            if isinstance(validation, (int, float))
            else _files(validation)
        )

    def __call__(self, split: str, d: int, dataset: Any, i: int) -> str:
        """``structure 7 of 'train.xyz' (training set 0)`` for the i-th sample of
        the d-th dataset of ``split``."""
        index = i
        # metatrain splits a file into nested subsets (validation, then test)
        while isinstance(dataset, torch.utils.data.Subset):
            index = int(dataset.indices[index])
            dataset = dataset.dataset
        files = self.files.get(split, [])
        if d < len(files):
            return f"structure {index} of '{files[d]}' ({split} set {d})"
        return f"structure {index} of {split} set {d}"


def _files(section: Any) -> List[str]:
    if not isinstance(section, list):
        return []
    names = []
    for entry in section:
        systems = entry.get("systems", {}) if isinstance(entry, dict) else {}
        names.append(str(systems.get("read_from", "?")))
    return names


def check_target(
    name: str, tensor: TensorMap, system: System, info: Any, where: str
) -> None:
    """Refuse non-finite values and per-atom arrays of the wrong shape."""
    for key, block in tensor.items():
        values = block.values
        if not bool(torch.isfinite(values).all()):
            bad = values[~torch.isfinite(values)][0].item()
            raise ValueError(
                f"target '{name}' of {where} has a non-finite value ({bad}). "
                "Every target value must be finite: fix or remove this structure "
                "(a NaN is only allowed in forces, stress and virial, where it "
                "marks a missing value)"
            )
        for parameter in block.gradients_list():
            gradient = block.gradient(parameter).values
            if bool(torch.isinf(gradient).any()):
                kind = {"positions": "forces", "strain": "stress/virial"}.get(
                    parameter, parameter
                )
                raise ValueError(
                    f"the {kind} of target '{name}' in {where} hold an infinite "
                    "value. Fix or remove this structure (write NaN for a value "
                    "that is missing: the loss skips it)"
                )
        if info.per_atom:
            expected = info.layout.block(key).values.shape[1:]
            found = tuple(values.shape)
            rows = len(system)
            if "atom_type" in key.names:
                # atomic basis: a block holds the atoms of its type only
                rows = int((system.types == int(key["atom_type"])).sum())
            if found[0] != rows or tuple(found[1:]) != tuple(expected):
                raise ValueError(
                    f"per-atom target '{name}' of {where} has shape {found}, "
                    f"expected ({rows}, "
                    + ", ".join(str(n) for n in expected)
                    + f"): one row per atom ({rows} atoms) with the "
                    "components and properties declared in the 'targets' section"
                )


def check_distances(system: System, where: str, neighbors: NeighborList) -> None:
    """Refuse two atoms closer than :data:`MIN_DISTANCE`, naming the pair."""
    if len(system) < 2:
        return
    positions = system.positions.detach().to(torch.float64).cpu().numpy()
    cell = system.cell.detach().to(torch.float64).cpu().numpy()
    periodic = system.pbc.cpu().numpy()
    if not periodic.any():
        cell = np.zeros((3, 3))
    i, j, distances = neighbors.compute(positions, cell, periodic, quantities="ijd")
    if len(i) > 0:
        k = int(np.argmin(distances))
        raise ValueError(
            f"atoms {int(i[k])} and {int(j[k])} of {where} are "
            f"{float(distances[k]):.3g} Å apart (closer than {MIN_DISTANCE} Å): "
            "overlapping atoms make the model's output NaN. Fix or remove this "
            "structure"
        )


def check_datasets(
    datasets: Dict[str, Sequence[Any]],
    targets: Dict[str, Any],
    names: StructureNames,
) -> Dict[str, List[int]]:
    """Run every check on every structure of the training and validation sets.

    :param datasets: ``{"training": [...], "validation": [...]}``.
    :param targets: the :class:`TargetInfo` of every target the model trains.
    :return: the number of atoms of every training structure, per dataset.
    """
    neighbors = NeighborList(cutoff=MIN_DISTANCE, full_list=False)
    sizes: Dict[str, List[int]] = {split: [] for split in datasets}
    total = sum(len(d) for sets in datasets.values() for d in sets)
    done = 0
    for split, sets in datasets.items():
        for d, dataset in enumerate(sets):
            for i in range(len(dataset)):
                sample = dataset[i]._asdict()
                system = sample["system"]
                sizes[split].append(len(system))
                where = names(split, d, dataset, i)
                check_distances(system, where, neighbors)
                for name, info in targets.items():
                    if name in sample:
                        check_target(name, sample[name], system, info, where)
                done += 1
                if done % 5000 == 0:
                    logging.info(f"Checked {done}/{total} structures")
    return sizes


def check_batch_limit(max_atoms: Optional[int], sizes: Dict[str, List[int]]) -> None:
    """Refuse a ``max_atoms_per_batch`` below every training structure; one line
    per set for the structures it leaves out (metatrain skips structures larger
    than the limit, in training and in validation)."""
    training = sizes.get("training", [])
    if max_atoms is None or not training:
        return
    if min(training) > max_atoms:
        raise ValueError(
            f"max_atoms_per_batch is {max_atoms}, but every training structure is "
            f"larger (from {min(training)} to {max(training)} atoms), so no batch "
            f"can be made. Set max_atoms_per_batch to at least {max(training)} to "
            "train on every structure"
        )
    for split, counts in sizes.items():
        too_large = sum(1 for n in counts if n > max_atoms)
        if too_large:
            logging.warning(
                f"{too_large} of {len(counts)} {split} structures have more than "
                f"max_atoms_per_batch={max_atoms} atoms (up to {max(counts)}) and "
                "are left out; raise max_atoms_per_batch to keep them"
            )


class SkipStructureLines(logging.Filter):
    """Drops metatrain's per-structure "Skipping this structure" warnings, which
    :func:`check_batch_limit` summarises in one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Skipping this structure" not in record.getMessage()


GRADIENTS = (("forces", "positions"), ("stress", "strain"), ("virial", "strain"))
"""The gradient sections of an energy target and the gradient each one fills."""


def check_energy_gradients(target: Any, info: Any) -> None:
    """Refuse forces, stress or virial that metatrain's reader dropped for a whole
    file, when the options ask for them under a key of their own, or when only
    some structures lack them (see :func:`missing_gradient_message`).

    metatrain reads an energy's gradients for every structure of a file at once
    and, when one structure lacks them, drops them for the whole file with only a
    warning ("No forces found in section 'energy'"): a misspelt key trains
    without forces. Called (by the import hook) with the energy section of the
    options and what metatrain read; reads the file again only in that case."""
    for kind, parameter in GRADIENTS:
        section = target.get(kind) if hasattr(target, "get") else None
        if not section or parameter in info.gradients:
            continue
        message = missing_gradient_message(
            str(section["read_from"]), str(section["key"]), kind
        )
        if message is not None:
            raise ValueError(message)


def missing_gradient_message(filename: str, key: str, kind: str) -> Optional[str]:
    """Why the ``kind`` (forces, stress, virial) under ``key`` cannot be read from
    ``filename``, or None when no structure has them under their default name
    (energies only: metatrain's warning is enough)."""
    from metatrain.utils.data.readers.ase import read

    frames = read(filename, ":")
    per_atom = kind == "forces"
    has = [key in (atoms.arrays if per_atom else atoms.info) for atoms in frames]
    where = "per-atom arrays" if per_atom else "per-structure values"
    if not any(has):
        if key == kind:
            return None
        found: List[str] = []
        for atoms in frames:
            names = atoms.arrays if per_atom else atoms.info
            found += [n for n in names if n not in ("numbers", "positions", *found)]
        return (
            f"no structure of '{filename}' has {kind} under the key {key!r} "
            f"('{kind}: key: {key}' in the options): its {where} are {found}. "
            f"Set the key of '{kind}' to the name the file uses."
        )
    missing = [i for i, present in enumerate(has) if not present]
    if missing:
        shown = ", ".join(str(i) for i in missing[:10])
        more = "" if len(missing) <= 10 else f" and {len(missing) - 10} more"
        return (
            f"{len(missing)} of the {len(frames)} structures of '{filename}' have no "
            f"{kind} under the key {key!r} (structures {shown}{more}, 0-based): "
            f"metatrain would drop the {kind} of every structure of the file. Mark "
            f"a missing value with NaN ({kind} of NaN in those structures): the loss "
            "skips NaN and the other structures keep theirs; or remove those "
            "structures."
        )
    if kind == "stress":
        flat = [i for i, atoms in enumerate(frames) if atoms.cell.volume == 0]
        flat = [i for i in flat if not np.isnan(np.asarray(frames[i].info[key])).all()]
        if flat:
            shown = ", ".join(str(i) for i in flat[:10])
            return (
                f"structures {shown} of '{filename}' (0-based) have a stress but no "
                "cell: a stress needs a periodic cell, and metatrain would drop the "
                "stress of every structure of the file. Give them NaN stress (the "
                "loss skips it) or a cell."
            )
    # every structure has the key: metatrain refused the values themselves
    from metatrain.utils.data.readers import ase as reader

    try:
        getattr(reader, f"_read_{kind}_ase")(filename, key)
    except Exception as error:
        return (
            f"metatrain cannot read the {kind} of '{filename}' under the key "
            f"{key!r} ({error}) and would drop them for every structure of the "
            f"file. Fix those values (NaN marks a missing one)."
        )
    return None
