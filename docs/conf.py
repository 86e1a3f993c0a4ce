"""Sphinx configuration of the metatrain-mace documentation.

The build needs no network: no intersphinx inventories are fetched and the theme is
a plain Python package. Build it with::

    sphinx-build -W -n --keep-going -b html docs docs/_build/html
"""

import os
import sys


DOCS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(DOCS)

# document this checkout, even when another copy of the package is installed
sys.path.insert(0, os.path.join(ROOT, "src"))
sys.path.insert(0, os.path.join(DOCS, "_ext"))

import metatrain_mace  # noqa: E402


# ``metatrain.experimental.mace`` must be this package (the .pth hook does it when
# the package is installed; this also covers interpreters that skip .pth files)
metatrain_mace.register(force=True)

project = "metatrain-mace"
author = "metatrain-mace developers"
copyright = "2026, metatrain-mace developers"
release = metatrain_mace.__version__
version = release

extensions = [
    "sphinx.ext.autodoc",
    "mace_hypers",
]

root_doc = "index"
exclude_patterns = ["_build", "_ext"]
templates_path: list = []

# hyperparameter reference: fields in source order, short type names
autodoc_member_order = "bysource"
autodoc_typehints_format = "short"
python_use_unqualified_type_names = True

# with -n, every cross-reference must resolve, except the constraint markers of
# ``annotated_types`` that appear in field types (an external package whose
# inventory we do not fetch)
nitpicky = True
nitpick_ignore = [
    ("py:class", "annotated_types.Gt"),
    ("py:class", "annotated_types.Ge"),
    ("py:class", "annotated_types.Lt"),
]

html_theme = "furo"
html_title = f"metatrain-mace {release}"
html_static_path: list = []
