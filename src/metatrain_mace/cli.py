"""The ``metatrain-mace`` command line: ``metatrain-mace export FILE.model``."""

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
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")

    from metatrain_mace.export import export_mace_model

    try:
        export_mace_model(args.path, args.output, head=args.head, dtype=args.dtype)
    except (FileNotFoundError, ValueError) as err:
        parser.exit(2, f"metatrain-mace export: error: {err}\n")
    logging.info(f"exported {args.path} to {args.output}")


if __name__ == "__main__":
    main()
