"""Every code block of README.md and docs/ marked runnable runs as written.

A block is marked by a comment just before it: ``.. runnable: KIND`` in the
reStructuredText pages, ``<!-- runnable: KIND -->`` in README.md. KIND is

- ``file NAME``: the block is written to the file NAME (an options file, a script);
- ``shell``: every line is a command (``mtt ...`` runs metatrain's command line in
  this process, to save the interpreter start-up; ``cd`` changes the folder; any
  other line runs in a shell);
- ``python``: the block runs as a script.

The blocks of one page run in order, in one folder that holds tiny versions of
the files the pages use (``alloy.xyz`` and ``my-data.xyz`` with energies, forces,
stresses and dipoles; a small MACE file ``MACE-foundation.model`` and an
``AtomicDielectricMACE`` file ``MACE-mu.model``; a copy of
``examples/``). Options files train one epoch (``num_epochs`` above 1 becomes 1).
"""

import os
import re
import runpy
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Tuple

import ase.io
import numpy as np
import pytest
import torch
import yaml

from helpers.datasets import make_alloy
from helpers.mace_files import build_dipole_model, save_mace_model


ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.rst"))]
RST_MARK = re.compile(r"^(\s*)\.\. runnable: (.+?)\s*$")
MD_MARK = re.compile(r"^\s*<!-- runnable: (.+?) -->\s*$")

Block = Tuple[str, str, int]  # kind, code, line number


def rst_blocks(lines: List[str]) -> List[Block]:
    blocks = []
    for n, line in enumerate(lines):
        mark = RST_MARK.match(line)
        if mark is None:
            continue
        start = n + 1
        while not lines[start].strip():
            start += 1
        assert ".. code-block::" in lines[start], f"line {n + 1}: no code block"
        start += 1
        body: List[str] = []
        indent = None
        for text in lines[start:]:
            if text.strip() and text.lstrip().startswith(":") and not body:
                continue  # options of the directive
            if text.strip():
                current = len(text) - len(text.lstrip())
                if indent is None:
                    indent = current
                elif current < indent:
                    break
            body.append(text)
        code = "\n".join(t[indent:] if t.strip() else "" for t in body)
        blocks.append((mark[2], code.strip() + "\n", n + 1))
    return blocks


def md_blocks(lines: List[str]) -> List[Block]:
    blocks = []
    for n, line in enumerate(lines):
        mark = MD_MARK.match(line)
        if mark is None:
            continue
        start = n + 1
        while not lines[start].strip():
            start += 1
        fence = lines[start].strip()
        assert fence.startswith("```"), f"line {n + 1}: no fenced block"
        indent = len(lines[start]) - len(lines[start].lstrip())
        end = start + 1
        while lines[end].strip() != "```":
            end += 1
        code = "\n".join(t[indent:] for t in lines[start + 1 : end])
        blocks.append((mark[1], code.strip() + "\n", n + 1))
    return blocks


def runnable_blocks(page: Path) -> List[Block]:
    lines = page.read_text().splitlines()
    return md_blocks(lines) if page.suffix == ".md" else rst_blocks(lines)


PAGES_WITH_BLOCKS = [p for p in PAGES if runnable_blocks(p)]


def trains(page: Path) -> bool:
    """Whether a block of the page runs ``mtt train`` (a slow test)."""
    return any("mtt train" in code for _, code, _ in runnable_blocks(page))


PAGE_PARAMS = [
    pytest.param(page, marks=pytest.mark.slow) if trains(page) else page
    for page in PAGES_WITH_BLOCKS
]


def one_epoch(text: str) -> str:
    """Options of a block with at most one epoch of training."""
    options = yaml.safe_load(text)
    training = (options.get("architecture") or {}).get("training")
    if isinstance(training, dict) and training.get("num_epochs", 2) > 1:
        training["num_epochs"] = 1
    elif not isinstance(training, dict) and "architecture" in options:
        options["architecture"]["training"] = {"num_epochs": 1}
    return yaml.safe_dump(options)


def run_mtt(arguments: List[str], cwd: Path) -> None:
    from metatrain.__main__ import main

    argv, previous = sys.argv, Path.cwd()
    sys.argv = ["mtt", *arguments]
    os.chdir(cwd)
    try:
        main()
    except SystemExit as exit:
        errors = sorted(cwd.glob("outputs/*/*/error.log")) + [cwd / "error.log"]
        log = "\n".join(p.read_text()[-3000:] for p in errors if p.is_file())
        assert exit.code in (0, None), f"mtt {' '.join(arguments)} failed:\n{log}"
    finally:
        sys.argv = argv
        os.chdir(previous)


def run_shell(code: str, cwd: Path) -> Path:
    for line in code.splitlines():
        line = line.split(" #")[0].strip()
        if not line:
            continue
        words = line.split()
        if words[0] == "cd":
            cwd = (cwd / words[1]).resolve()
        elif words[0] == "mtt":
            if words[1] == "train":
                options = cwd / words[2]
                options.write_text(one_epoch(options.read_text()))
            run_mtt(words[1:], cwd)
        else:
            environment = {**os.environ, "PATH": f"{Path(sys.executable).parent}:"}
            environment["PATH"] += os.environ.get("PATH", "")
            result = subprocess.run(
                line,
                shell=True,
                cwd=cwd,
                env=environment,
                capture_output=True,
                text=True,
            )
            assert result.returncode == 0, f"{line}\n{result.stderr[-3000:]}"
    return cwd


def run_python(code: str, cwd: Path) -> None:
    script = cwd / "_block.py"
    script.write_text(code)
    previous = Path.cwd()
    os.chdir(cwd)
    try:
        runpy.run_path(str(script), run_name="__main__")
    finally:
        os.chdir(previous)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The files the pages use, made once."""
    folder = tmp_path_factory.mktemp("docs-files")
    frames = ase.io.read(make_alloy(folder / "alloy.xyz", n_structures=16), ":")
    for atoms in frames:
        # a dipole-like vector per structure (any numbers will do for one epoch)
        charges = np.where(atoms.numbers == 29, 0.1, -0.1)
        atoms.info["REF_dipole"] = charges @ atoms.positions
    ase.io.write(folder / "my-data.xyz", frames, format="extxyz")
    ase.io.write(folder / "structure.xyz", frames[0], format="extxyz")
    ase.io.write(folder / "tiny.xyz", frames[:2], format="extxyz")
    ase.io.write(folder / "replay.xyz", frames[8:], format="extxyz")
    save_mace_model(folder / "MACE-foundation.model", atomic_numbers=[29, 79])
    torch.save(
        build_dipole_model("dielectric", atomic_numbers=[29, 79]),
        folder / "MACE-mu.model",
    )
    from metatrain_mace.tools.export import export_mace_model

    export_mace_model(str(folder / "MACE-foundation.model"), str(folder / "model.pt"))
    shutil.copytree(
        ROOT / "examples",
        folder / "examples",
        ignore=shutil.ignore_patterns("outputs", "*.pt", "*.ckpt", "*.xyz"),
    )
    return folder


def test_pages_have_runnable_blocks() -> None:
    names = {p.name for p in PAGES_WITH_BLOCKS}
    for page in ["README.md", "quickstart.rst", "finetuning.rst"]:
        assert page in names, page


@pytest.mark.parametrize("page", PAGE_PARAMS, ids=lambda p: p.name)
def test_page_runs_as_written(page: Path, files: Path, tmp_path: Path) -> None:
    shutil.copytree(files, tmp_path, dirs_exist_ok=True)
    cwd = tmp_path
    done: Dict[str, int] = {}
    for kind, code, line in runnable_blocks(page):
        where = f"{page.name}, block at line {line}"
        try:
            if kind.startswith("file "):
                name = kind.split(maxsplit=1)[1]
                (cwd / name).write_text(code)
            elif kind == "shell":
                cwd = run_shell(code, cwd)
            elif kind == "python":
                run_python(code, cwd)
            else:
                raise ValueError(f"unknown kind of runnable block {kind!r}")
        except BaseException as error:
            raise AssertionError(f"{where} failed: {error}") from error
        done[kind] = done.get(kind, 0) + 1
    assert done
