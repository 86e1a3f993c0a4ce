"""Sphinx extension listing every field of a hyperparameter TypedDict.

``.. mace-hypers:: metatrain.experimental.mace.documentation.ModelHypers`` expands to
one ``autoattribute`` directive per field, in source order, so that the reference
page can never miss a field that ``documentation.py`` defines. autodoc renders each
field with the docstring written below it, its type and its default; fields without
a default (``NotRequired`` keys) get a sentence saying so, and a field without a
docstring is reported as a warning (an error with ``sphinx-build -W``).
"""

import importlib
from typing import Any, Dict, List

from docutils import nodes
from docutils.statemachine import StringList
from sphinx.application import Sphinx
from sphinx.pycode import ModuleAnalyzer
from sphinx.util import logging
from sphinx.util.docutils import SphinxDirective
from sphinx.util.nodes import nested_parse_with_titles


LOGGER = logging.getLogger(__name__)
NO_DEFAULT = "*No default*: the key is left out of the defaults and only used when set."


def import_object(path: str) -> Any:
    """Import ``module.Class`` given as a dotted path."""
    module_name, _, attribute = path.rpartition(".")
    return getattr(importlib.import_module(module_name), attribute)


def field_names(hypers_class: type) -> List[str]:
    """Names of the fields of a TypedDict, in source order."""
    return list(hypers_class.__annotations__)


class MaceHypersDirective(SphinxDirective):
    """Emit an ``autoattribute`` for every field of a hyperparameter class."""

    required_arguments = 1
    has_content = False

    def run(self) -> List[nodes.Node]:
        path = self.arguments[0]
        try:
            hypers_class = import_object(path)
        except (ImportError, AttributeError) as err:
            raise self.error(f"cannot import {path!r}: {err}") from err

        attribute_docs = ModuleAnalyzer.for_module(
            hypers_class.__module__
        ).find_attr_docs()
        lines = StringList()
        source = self.get_source_info()[0]
        for name in field_names(hypers_class):
            if not "".join(attribute_docs.get((hypers_class.__name__, name), [])):
                LOGGER.warning(
                    f"hyperparameter {path}.{name} has no docstring",
                    type="mace_hypers",
                    location=self.get_location(),
                )
            lines.append(f".. autoattribute:: {path}.{name}", source)
            lines.append("", source)
        container = nodes.container(classes=["mace-hypers"])
        nested_parse_with_titles(self.state, lines, container)
        return [container]


def add_missing_default(
    app: Sphinx,
    what: str,
    name: str,
    obj: Any,
    options: Dict[str, Any],
    lines: List[str],
) -> None:
    """Complete the docstring of hyperparameter fields (autodoc event)."""
    if what != "attribute" or not name.startswith(app.config.mace_hypers_prefix):
        return
    class_path, _, field = name.rpartition(".")
    if field not in vars(import_object(class_path)):
        lines.extend(["", NO_DEFAULT])


def setup(app: Sphinx) -> Dict[str, Any]:
    app.setup_extension("sphinx.ext.autodoc")
    app.add_config_value(
        "mace_hypers_prefix", "metatrain.experimental.mace.documentation.", "env"
    )
    app.add_directive("mace-hypers", MaceHypersDirective)
    app.connect("autodoc-process-docstring", add_missing_default)
    return {"version": "1.0", "parallel_read_safe": True}
