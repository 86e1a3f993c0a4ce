"""Write ``default_hypers/mace-default-hypers.yaml`` from ``documentation.py``.

The file holds the full default ``architecture:`` section of ``experimental.mace``,
as produced by metatrain's own writer (``metatrain.utils.architectures.
write_hypers_yaml``), under a short header. Run it after changing a default::

    python scripts/write_default_hypers.py

``--check`` only compares the file with freshly generated content and exits with
status 1 when they differ (``tests/test_default_hypers.py`` does the same).
"""

import argparse
import sys
import tempfile
from pathlib import Path

from metatrain.utils.architectures import write_hypers_yaml

import metatrain_mace


ARCHITECTURE = "experimental.mace"
OUTPUT = (
    Path(__file__).resolve().parent.parent
    / "default_hypers"
    / ("mace-default-hypers.yaml")
)
HEADER = """\
# Default hyperparameters of the experimental.mace architecture (metatrain-mace).
# Generated from src/metatrain_mace/documentation.py by
# scripts/write_default_hypers.py: do not edit by hand, run that script instead.
"""


def generate() -> str:
    """Return the content of the default hyperparameters file."""
    # the alias must point at this package even if the .pth hook was skipped or
    # disabled, so that the defaults are ours and not metatrain's in-tree copy
    metatrain_mace.register(force=True)
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "hypers.yaml"
        write_hypers_yaml(ARCHITECTURE, path)
        return HEADER + path.read_text()


def main(argv: "list[str] | None" = None) -> int:
    """Write the file, or with ``--check`` compare it with generated content."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--check",
        action="store_true",
        help="do not write; exit with status 1 if the file is out of date",
    )
    parser.add_argument("--output", type=Path, default=OUTPUT, help="file to write")
    args = parser.parse_args(argv)

    content = generate()
    if args.check:
        current = args.output.read_text() if args.output.exists() else None
        if current != content:
            print(
                f"{args.output} is out of date: run "
                "'python scripts/write_default_hypers.py'",
                file=sys.stderr,
            )
            return 1
        print(f"{args.output} is up to date")
        return 0
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(content)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
