"""Build the Sphinx documentation (offline, warnings as errors) and check that the
reference shows every hyperparameter with its type, default and description."""

import ast
import html
import re
import subprocess
import sys
import typing
from pathlib import Path
from typing import Dict

import pytest
from sphinx.util.inspect import object_description

from metatrain_mace.documentation import ModelHypers, TrainerHypers


ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PREFIX = "metatrain.experimental.mace.documentation"
PAGES = [
    "index",
    "overview",
    "quickstart",
    "default-hypers",
    "tuning",
    "recipe",
    "reference",
    "outputs",
    "foundation-models",
    "finetuning",
    "charge-spin",
    "training-at-scale",
    "precision-and-speed",
    "engines",
    "troubleshooting",
    "changelog",
]


def sphinx_build(source: Path, output: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "sphinx", "-W", "-n", "--keep-going"]
    command += ["-b", "html", "-d", str(output / ".doctrees"), str(source)]
    return subprocess.run(
        [*command, str(output)], capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    output = tmp_path_factory.mktemp("docs") / "html"
    result = sphinx_build(DOCS, output)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "WARNING" not in result.stderr, result.stderr
    return output


def text(fragment: str) -> str:
    """Visible text of an HTML fragment, whitespace collapsed."""
    without_tags = re.sub(r"<[^>]+>", "", fragment)
    return " ".join(html.unescape(without_tags).replace("¶", "").split())


def field_entries(page: str) -> Dict[str, tuple]:
    """Map the id of every documented attribute to (signature, description)."""
    pattern = re.compile(
        r'<dt class="sig sig-object py" id="([^"]+)">(.*?)</dt>\s*<dd>(.*?)</dd>',
        re.S,
    )
    return {m[1]: (text(m[2]), text(m[3])) for m in pattern.finditer(page)}


def test_all_pages_are_built(built: Path) -> None:
    for page in PAGES:
        assert (built / f"{page}.html").is_file(), page


@pytest.mark.parametrize("hypers", [ModelHypers, TrainerHypers])
def test_every_field_has_type_default_and_description(
    built: Path, hypers: type
) -> None:
    entries = field_entries((built / "reference.html").read_text())
    fields = list(hypers.__annotations__)
    assert len(fields) > 20
    for name in fields:
        anchor = f"{PREFIX}.{hypers.__name__}.{name}"
        assert anchor in entries, f"{anchor} is missing from the reference"
        signature, description = entries[anchor]
        match = re.fullmatch(
            rf"{hypers.__name__}\.{name}: (?P<type>.+?)(?: = (?P<default>.+))?",
            signature,
        )
        assert match, f"no type in the signature {signature!r}"
        if name in vars(hypers):
            expected = object_description(vars(hypers)[name])
            assert match["default"] == expected, (name, signature)
        else:
            assert match["default"] is None, signature
            assert "No default" in description, description
        assert len(description) > 20, f"{name} has no description: {description!r}"


def test_types_and_descriptions_are_the_documented_ones(built: Path) -> None:
    entries = field_entries((built / "reference.html").read_text())
    r_max = entries[f"{PREFIX}.ModelHypers.r_max"]
    assert r_max[0] == "ModelHypers.r_max: Annotated[float, Gt(gt=0)] = 5.0"
    assert r_max[1].startswith("Cutoff radius (in the length unit of the dataset")
    optimizer = entries[f"{PREFIX}.TrainerHypers.optimizer"]
    assert optimizer[0] == (
        "TrainerHypers.optimizer: Literal['adam', 'adamw'] = 'adam'"
    )
    hints = typing.get_type_hints(ModelHypers)
    assert hints["mace_model"] == typing.Optional[str]
    assert entries[f"{PREFIX}.ModelHypers.mace_model"][0] == (
        "ModelHypers.mace_model: str | None = None"
    )


def test_default_hypers_file_is_shown(built: Path) -> None:
    page = text((built / "default-hypers.html").read_text())
    shipped = (ROOT / "default_hypers" / "mace-default-hypers.yaml").read_text()
    for line in shipped.splitlines():
        assert " ".join(line.split()) in page, line


def test_cross_references_reach_the_reference(built: Path) -> None:
    tuning = (built / "tuning.html").read_text()
    anchor = f"reference.html#{PREFIX}.ModelHypers.hidden_irreps"
    assert anchor in tuning


def test_build_needs_no_network() -> None:
    tree = ast.parse((DOCS / "conf.py").read_text())
    assigned = {
        target.id: node.value
        for node in tree.body
        if isinstance(node, (ast.Assign, ast.AnnAssign))
        for target in (node.targets if isinstance(node, ast.Assign) else [node.target])
        if isinstance(target, ast.Name)
    }
    extensions = ast.literal_eval(assigned["extensions"])
    assert "sphinx.ext.intersphinx" not in extensions
    assert "intersphinx_mapping" not in assigned
    # no remote theme assets, logos or scripts either
    strings = [
        node.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str)
    ]
    docstring = ast.get_docstring(tree)
    assert not [s for s in strings if "://" in s and s != docstring]


def test_missing_field_docstring_fails_the_build(tmp_path: Path) -> None:
    source = tmp_path / "source"
    source.mkdir()
    (source / "undocumented_hypers.py").write_text(
        "from typing_extensions import TypedDict\n\n\n"
        "class Hypers(TypedDict):\n"
        "    documented: int = 1\n"
        '    """A documented field."""\n'
        "    undocumented: int = 2\n"
    )
    (source / "conf.py").write_text(
        "import sys\n"
        f"sys.path[:0] = [{str(source)!r}, {str(DOCS / '_ext')!r}]\n"
        "extensions = ['mace_hypers']\n"
        "mace_hypers_prefix = 'undocumented_hypers.'\n"
    )
    (source / "index.rst").write_text(
        "Test\n====\n\n.. mace-hypers:: undocumented_hypers.Hypers\n"
    )
    result = sphinx_build(source, tmp_path / "html")
    assert result.returncode != 0
    assert "undocumented_hypers.Hypers.undocumented has no docstring" in (result.stderr)
    assert "Hypers.documented has no docstring" not in result.stderr
