"""The ``metatrain-mace`` command: ``export FILE.model``, ``to-mace CHECKPOINT``,
``plot RUN_FOLDER`` and ``precision MODEL STRUCTURES``."""

import argparse
import logging
from typing import List, Optional


def main(argv: Optional[List[str]] = None) -> None:
    """Entry point of the ``metatrain-mace`` command."""
    parser = argparse.ArgumentParser(
        prog="metatrain-mace",
        description="Tools of the metatrain-mace package (MACE for metatrain).",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    export = commands.add_parser(
        "export",
        help="export a MACE model file as a metatomic model",
        description=(
            "Export a MACE model file (as written by mace-torch) as a metatomic "
            "model usable from ASE, LAMMPS and other metatomic engines. The file is "
            "a pickle and loading it runs code stored in it: only export files you "
            "trust."
        ),
    )
    export.add_argument("path", help="MACE model file, e.g. mace-mp-0-medium.model")
    export.add_argument(
        "-o",
        "--output",
        default="model.pt",
        help="exported model (default %(default)s)",
    )
    export.add_argument("--head", default=None, help="head of a multi-head model")
    export.add_argument(
        "--dtype",
        default="float64",
        choices=["float64", "float32"],
        help="floating point precision of the exported model (default %(default)s)",
    )
    to_mace = commands.add_parser(
        "to-mace",
        help="write a model trained here as a MACE model file (for MACE engines)",
        description=(
            "Write the energy part of a model of this package (a checkpoint written "
            "by mtt train, or a model exported by this package) as a mace-torch "
            "model file (ScaleShiftMACE): MACE's calculator, its LAMMPS exports, "
            "symmetrix and other MACE engines read it. Other targets are left out. "
            "Checkpoints are pickles: only convert files you trust."
        ),
    )
    to_mace.add_argument("path", help="checkpoint (.ckpt) or exported model (.pt)")
    to_mace.add_argument(
        "-o",
        "--output",
        default=None,
        help="MACE model file to write (default: PATH with the suffix .model)",
    )
    to_mace.add_argument(
        "--head",
        default=None,
        help="the energy target to write (default: 'mace_head_target')",
    )
    to_mace.add_argument(
        "--dtype",
        default="float64",
        choices=["float64", "float32"],
        help="floating point precision of the file (default %(default)s)",
    )
    plot = commands.add_parser(
        "plot",
        help="draw the training curves of an mtt train run, or parity plots of an "
        "mtt eval run",
        description=(
            "Draw the loss, the errors and the learning rate of an mtt train run "
            "(its train.csv) against the epoch, and/or the predictions written by "
            "mtt eval against their references, as PNG files."
        ),
    )
    plot.add_argument(
        "folder",
        nargs="?",
        default=None,
        help="output folder of an mtt train run (outputs/DATE/TIME)",
    )
    plot.add_argument(
        "-o",
        "--output",
        default=None,
        help="PNG file of the training curves (default FOLDER/training-curves.png)",
    )
    plot.add_argument(
        "--predictions",
        default=None,
        help="predictions written by mtt eval (e.g. predictions.xyz)",
    )
    plot.add_argument(
        "--references",
        default=None,
        help="the options file given to mtt eval (eval.yaml), which names the "
        "reference values",
    )
    plot.add_argument(
        "--parity-output",
        default=None,
        help="PNG file of the parity plots (default PREDICTIONS-parity.png)",
    )
    precision = commands.add_parser(
        "precision",
        help="per-block errors of float32/float16/bfloat16 against float64",
        description=(
            "Run every block of a model (embeddings, interactions, products, "
            "readouts) in lower precisions with the same weights as float64, on "
            "the float64 inputs of each block, and report the largest absolute "
            "and relative errors of the outputs and of the gradients, then the "
            "end-to-end errors of energy per atom, forces and stress. MACE files "
            "and checkpoints are pickles: only give files you trust. Exported models "
            "are rebuilt from the record their export stores."
        ),
    )
    precision.add_argument(
        "model",
        help="checkpoint (.ckpt), exported model (.pt) or MACE model file (.model)",
    )
    precision.add_argument(
        "structures", help="structures to evaluate (any file ASE reads)"
    )
    precision.add_argument(
        "-o", "--output", default="precision.csv", help="CSV report (%(default)s)"
    )
    precision.add_argument("--plot", default=None, help="PNG plot of the report")
    precision.add_argument(
        "--dtypes",
        default="float32,float16,bfloat16",
        help="comma-separated dtypes to compare with float64 (%(default)s)",
    )
    precision.add_argument(
        "--backend", default="e3nn", choices=["e3nn", "cueq"], help="%(default)s"
    )
    precision.add_argument("--head", default=None, help="head of a multi-head file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")

    if args.command == "plot":
        _plot(plot, args)
        return
    if args.command == "precision":
        _precision(precision, args)
        return
    if args.command == "to-mace":
        _to_mace(to_mace, args)
        return

    from metatrain_mace.tools.export import export_mace_model

    try:
        export_mace_model(
            args.path,
            args.output,
            head=args.head,
            dtype=args.dtype,
            source="the PATH argument of metatrain-mace export",
        )
    except (FileNotFoundError, ValueError, RuntimeError) as err:
        # RuntimeError: a foundation model name that cannot be downloaded
        parser.exit(2, f"metatrain-mace export: error: {err}\n")
    logging.info(f"exported {args.path} to {args.output}")


def _precision(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """``metatrain-mace precision``: the per-block precision report."""
    import ase.io

    from metatrain_mace.tools.precision import (
        load_for_report,
        plot_report,
        precision_report,
        write_csv,
    )

    try:
        model = load_for_report(
            args.model,
            head=args.head,
            source="the MODEL argument of metatrain-mace precision",
        )
        frames = ase.io.read(args.structures, ":")
        dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
        rows = precision_report(model, frames, dtypes, backend=args.backend)
    except (FileNotFoundError, ValueError, ImportError, RuntimeError) as err:
        parser.exit(2, f"metatrain-mace precision: error: {err}\n")
    logging.info(f"wrote {write_csv(rows, args.output)}")
    if args.plot is not None:
        logging.info(f"wrote {plot_report(rows, args.plot)}")


def _to_mace(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """``metatrain-mace to-mace``: a MACE model file of the energy part."""
    from pathlib import Path

    from metatrain_mace.tools.to_mace import write_mace_file

    output = args.output or str(Path(args.path).with_suffix(".model"))
    if Path(output).resolve() == Path(args.path).resolve():
        parser.exit(2, "metatrain-mace to-mace: error: -o must differ from PATH\n")
    try:
        mace = write_mace_file(args.path, output, head=args.head, dtype=args.dtype)
    except (FileNotFoundError, ValueError) as err:
        parser.exit(2, f"metatrain-mace to-mace: error: {err}\n")
    logging.info(f"wrote {output} ({mace.written_by})")


def _plot(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """``metatrain-mace plot``: training curves and/or parity plots."""
    from metatrain_mace.tools.plotting import plot_parity, plot_training

    if (args.predictions is None) != (args.references is None):
        parser.error("--predictions and --references go together")
    if args.folder is None and args.predictions is None:
        parser.error("give a run folder, or --predictions and --references")
    try:
        if args.folder is not None:
            logging.info(f"wrote {plot_training(args.folder, args.output)}")
        if args.predictions is not None:
            written = plot_parity(args.predictions, args.references, args.parity_output)
            logging.info(f"wrote {written}")
    except (FileNotFoundError, ValueError) as err:
        parser.exit(2, f"metatrain-mace plot: error: {err}\n")


if __name__ == "__main__":
    main()
