"""Training curves of an ``mtt train`` run, drawn from metatrain's ``train.csv``.

``metatrain-mace plot OUTPUT_DIR`` (or :func:`plot_training`) writes
``training-curves.png`` into the run's folder: the loss, every logged error
(training and validation, one panel per quantity) and the learning rate against
the epoch, with a line where stage two starts (read from ``train.log``). The
numbers drawn are also stored in the PNG's ``Description`` text chunk (JSON), so
that the picture can be checked against the log.
"""

import csv
import json
import re
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union


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
