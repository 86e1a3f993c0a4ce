"""Plots of a training run and of an evaluation, as PNG files.

- ``metatrain-mace plot OUTPUT_DIR`` (:func:`plot_training`) writes
  ``training-curves.png`` into the run's folder: the loss, every logged error
  (training and validation, one panel per quantity) and the learning rate against
  the epoch, with a line where stage two starts (read from ``train.log``).
- ``metatrain-mace plot --predictions PRED.xyz --references eval.yaml``
  (:func:`plot_parity`) draws the predictions written by ``mtt eval`` against the
  reference values named by the options file given to ``mtt eval``: one panel per
  target (energies per atom), forces and stress, with the RMSE in each.

The numbers drawn are also stored in each PNG's ``Description`` text chunk (JSON),
so that a picture can be checked against the log.
"""

import csv
import functools
import json
import re
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union


Series = Dict[str, List[float]]


def read_train_csv(path: Union[str, Path]) -> Tuple[List[int], Series, Dict[str, str]]:
    """Epochs, the columns (name -> values) and their units of a ``train.csv``."""
    with open(path, newline="") as file:
        rows = list(csv.reader(file))
    if len(rows) < 3:
        raise ValueError(f"'{path}' holds no epoch yet")
    header, units, data = rows[0], rows[1], rows[2:]
    epochs = [int(row[0]) for row in data]
    columns: Series = {
        name: [float(row[i]) if row[i].strip() else float("nan") for row in data]
        for i, name in enumerate(header)
        if i > 0
    }
    return (
        epochs,
        columns,
        {name: unit for name, unit in zip(header, units, strict=False)},
    )


def stage_two_epoch(folder: Path) -> Optional[int]:
    """The first epoch of stage two, from the run's log (None without one)."""
    log = folder / "train.log"
    if not log.is_file():
        return None
    match = re.search(r"Stage two from epoch (\d+)", log.read_text())
    return None if match is None else int(match.group(1))


def _panels(columns: Series) -> Dict[str, List[str]]:
    """Columns grouped by quantity: "loss", each error ("energy RMSE (per
    atom)"...), "learning rate"; training and validation share a panel."""
    panels: Dict[str, List[str]] = {}
    for name in columns:
        quantity = re.sub(r"^(training|validation) ", "", name)
        quantity = re.sub(r" (RMSE|MAE)\b", "", quantity)
        panels.setdefault(quantity, []).append(name)
    return panels


def plot_training(
    folder: Union[str, Path], output: Optional[Union[str, Path]] = None
) -> Path:
    """Draw the training curves of the run in ``folder`` (an ``outputs/DATE/TIME``
    folder of ``mtt train``); returns the PNG written (``output``, by default
    ``folder/training-curves.png``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    folder = Path(folder)
    csv_path = folder / "train.csv"
    if not csv_path.is_file():
        raise FileNotFoundError(
            f"no train.csv in '{folder}': give the output folder of an mtt train "
            "run (outputs/<date>/<time>)"
        )
    epochs, columns, units = read_train_csv(csv_path)
    panels = _panels(columns)
    stage_two = stage_two_epoch(folder)
    figure, axes = plt.subplots(
        len(panels), 1, figsize=(7, 2.6 * len(panels)), sharex=True, squeeze=False
    )
    for axis, (quantity, names) in zip(axes[:, 0], panels.items(), strict=True):
        for name in names:
            label = " ".join(
                word for word in name.split(" ") if word not in quantity.split(" ")
            )
            axis.plot(epochs, columns[name], marker=".", label=label or None)
        unit = units.get(names[0], "")
        axis.set_ylabel(f"{quantity} ({unit})" if unit else quantity)
        values = [v for name in names for v in columns[name] if v == v]
        if values and min(values) > 0 and max(values) / min(values) > 20:
            axis.set_yscale("log")
        if stage_two is not None:
            axis.axvline(stage_two, color="grey", linestyle="--", label="stage two")
        if any(axis.get_legend_handles_labels()[1]):
            axis.legend(fontsize="small")
    axes[-1, 0].set_xlabel("epoch")
    axes[-1, 0].xaxis.set_major_locator(MaxNLocator(integer=True))
    figure.tight_layout()
    output = folder / "training-curves.png" if output is None else Path(output)
    plotted = {"epochs": epochs, "stage_two_epoch": stage_two, "columns": columns}
    figure.savefig(output, dpi=100, metadata={"Description": json.dumps(plotted)})
    plt.close(figure)
    return output


def _lookup(atoms: Any, key: str) -> Optional[Any]:
    """A value of an extended XYZ frame: ASE moves the keys it knows (energy,
    forces, stress, dipole...) from ``info``/``arrays`` into calculator results."""
    import numpy as np

    for table in (atoms.info, atoms.arrays):
        if key in table:
            return np.asarray(table[key], dtype=float)
    if atoms.calc is not None and key in atoms.calc.results:
        return np.asarray(atoms.calc.results[key], dtype=float)
    return None


def _predicted_forces(atoms: Any, name: str) -> Optional[Any]:
    """Forces written by ``mtt eval``: ``forces`` (``forces[NAME]`` for other
    energies), or minus the ``NAME_positions_gradients`` it writes when the model
    does not declare its output an energy."""
    forces = _lookup(atoms, "forces" if name == "energy" else f"forces[{name}]")
    if forces is None:
        gradients = _lookup(atoms, f"{name}_positions_gradients")
        forces = None if gradients is None else -gradients
    return forces


def _predicted_stress(atoms: Any, name: str) -> Optional[Any]:
    """Stress written by ``mtt eval`` (or its strain gradients over the volume)."""
    stress = _lookup(atoms, "stress" if name == "energy" else f"stress[{name}]")
    if stress is None:
        gradients = _lookup(atoms, f"{name}_strain_gradients")
        volume = atoms.get_volume() if atoms.cell.rank == 3 else 0.0
        stress = None if gradients is None or volume == 0 else gradients / volume
    return stress


def _as_3x3(stress: Any) -> Any:
    """Stress as 9 numbers, from 3x3 or Voigt (6) form."""
    import numpy as np
    from ase.stress import voigt_6_to_full_3x3_stress

    stress = np.asarray(stress, dtype=float).reshape(-1)
    if stress.size == 6:
        stress = voigt_6_to_full_3x3_stress(stress).reshape(-1)
    return stress


def parity_data(
    predictions: Union[str, Path], references: Union[str, Path]
) -> Dict[str, Dict[str, Any]]:
    """Pairs of (reference, prediction) values per panel: ``{title: {"reference":
    [...], "prediction": [...], "unit": ...}}``, from the file written by ``mtt
    eval`` and the options file (``eval.yaml``) that named its references."""
    import ase.io
    import numpy as np
    from metatrain.utils.omegaconf import expand_dataset_config
    from omegaconf import OmegaConf

    datasets = expand_dataset_config(OmegaConf.load(str(references)))
    if len(datasets) != 1:
        raise ValueError(
            f"'{references}' lists {len(datasets)} datasets; mtt eval writes one "
            "predictions file per dataset: plot them one at a time, with an options "
            "file of one dataset each"
        )
    dataset = datasets[0]
    predicted = ase.io.read(str(predictions), ":")
    reference_path = Path(str(dataset["systems"]["read_from"]))
    if not reference_path.is_absolute():
        reference_path = Path(references).parent / reference_path
    reference = ase.io.read(str(reference_path), ":")
    if len(predicted) != len(reference):
        raise ValueError(
            f"'{predictions}' holds {len(predicted)} structures and "
            f"'{reference_path}' {len(reference)}: give the options file that mtt "
            "eval used to write the predictions"
        )

    panels: Dict[str, Dict[str, Any]] = {}

    def add(title: str, unit: str, ref_key: str, predict: Any, kind: str) -> None:
        pairs: Tuple[List[float], List[float]] = ([], [])
        for ref_atoms, pred_atoms in zip(reference, predicted, strict=True):
            ref, pred = _lookup(ref_atoms, ref_key), predict(pred_atoms)
            if ref is None or pred is None:
                return  # not in the files: no panel
            if kind == "per atom":
                ref, pred = ref / len(ref_atoms), pred / len(pred_atoms)
            elif kind == "stress":
                ref, pred = _as_3x3(ref), _as_3x3(pred)
            pairs[0].extend(np.asarray(ref).reshape(-1).tolist())
            pairs[1].extend(np.asarray(pred).reshape(-1).tolist())
        panels[title] = {"reference": pairs[0], "prediction": pairs[1], "unit": unit}

    for name, target in dataset["targets"].items():
        unit = str(target["unit"])
        extensive = target["quantity"] == "energy" and target["sample_kind"] == "system"
        values = functools.partial(_lookup, key=name)
        if extensive:
            add(f"{name} per atom", f"{unit}/atom", target["key"], values, "per atom")
        else:
            add(name, unit, target["key"], values, "values")
        if target["forces"]:
            add(
                "forces" if name == "energy" else f"forces[{name}]",
                f"{unit}/A",
                target["forces"]["key"],
                functools.partial(_predicted_forces, name=name),
                "values",
            )
        if target["stress"]:
            add(
                "stress" if name == "energy" else f"stress[{name}]",
                f"{unit}/A^3",
                target["stress"]["key"],
                functools.partial(_predicted_stress, name=name),
                "stress",
            )
    if not panels:
        raise ValueError(
            f"none of the targets of '{references}' has both reference values in "
            f"'{reference_path}' and predictions in '{predictions}'"
        )
    return panels


def plot_parity(
    predictions: Union[str, Path],
    references: Union[str, Path],
    output: Optional[Union[str, Path]] = None,
) -> Path:
    """Draw predictions against references (see :func:`parity_data`); returns the
    PNG written (``output``, by default ``PREDICTIONS-parity.png`` beside the
    predictions)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    panels = parity_data(predictions, references)
    columns = min(3, len(panels))
    rows = (len(panels) + columns - 1) // columns
    figure, axes = plt.subplots(
        rows, columns, figsize=(3.6 * columns, 3.6 * rows), squeeze=False
    )
    for axis in axes.reshape(-1)[len(panels) :]:
        axis.set_visible(False)
    for axis, (title, panel) in zip(axes.reshape(-1), panels.items(), strict=False):
        ref = np.asarray(panel["reference"])
        pred = np.asarray(panel["prediction"])
        panel["rmse"] = float(np.sqrt(np.mean((pred - ref) ** 2)))
        low, high = float(min(ref.min(), pred.min())), float(max(ref.max(), pred.max()))
        axis.plot([low, high], [low, high], color="grey", linewidth=0.8)
        axis.scatter(ref, pred, s=6, alpha=0.6)
        axis.set_title(f"{title}\nRMSE {panel['rmse']:.3g} {panel['unit']}", fontsize=9)
        axis.set_xlabel(f"reference ({panel['unit']})")
        axis.set_ylabel(f"prediction ({panel['unit']})")
        axis.set_aspect("equal", adjustable="datalim")
    figure.tight_layout()
    predictions = Path(predictions)
    if output is None:
        output = predictions.with_name(predictions.stem + "-parity.png")
    figure.savefig(output, dpi=100, metadata={"Description": json.dumps(panels)})
    plt.close(figure)
    return Path(output)
