#!/usr/bin/env python
"""The import graph of ``src/metatrain_mace``: files, arrows, cycles, arrows up.

Usage: ``python scripts/import_graph.py [SRC_DIR]`` (default: ``src`` of this
repository). Every ``import metatrain_mace...`` / ``from metatrain_mace... import``
in a module, at any depth (lazy imports inside functions count), is an arrow from
that module to the imported one; ``from metatrain_mace.pkg import module`` points to
the module. Prints the counts, every cycle (strongly connected components of more
than one module) and every arrow that points *up* the layers below (a lower layer
importing a higher one). Exit status 1 when there is a cycle or an arrow up, so that
the layout is checked by the test suite (``tests/test_layout.py``).

Layers, lowest first (a module may import its own layer and the ones below):

0. ``_version``, ``mace_import``, ``documentation``, ``checkpoints``,
   ``parameter_names``: leaves every other module may use;
1. ``trunk``: MACE itself (building, files, backends and dtype, conditioning,
   graph, running it);
2. ``heads``: the heads on the node features and the TensorMaps they fill;
3. ``finetune``: fine-tuning strategies and LoRA (on a built model); ``lora``,
   its old home kept for the pickles of old checkpoints;
4. ``model``, ``records``: the model, composed of the parts below;
5. ``train``: training steps;
6. ``trainer``: the trainer, made of the steps;
7. ``tools``: commands around models (may use everything);
8. ``__init__``: the package face.
"""

import ast
import sys
from pathlib import Path
from typing import Dict, List, Set


PACKAGE = "metatrain_mace"
LAYERS = {
    "_version": 0,
    "mace_import": 0,
    "documentation": 0,
    "checkpoints": 0,
    "parameter_names": 0,
    "lora": 3,
    "trunk": 1,
    "heads": 2,
    "finetune": 3,
    "records": 4,
    "model": 4,
    "train": 5,
    "trainer": 6,
    "tools": 7,
    "__init__": 8,
}


def module_name(path: Path, src: Path) -> str:
    parts = list(path.relative_to(src).with_suffix("").parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1]
    return ".".join(parts)


def layer(module: str) -> int:
    parts = module.split(".")
    if len(parts) == 1:  # the package itself: its __init__
        return LAYERS["__init__"]
    return LAYERS.get(parts[1], -1)


def arrows(src: Path) -> Dict[str, Set[str]]:
    modules = {
        module_name(path, src): path for path in sorted((src / PACKAGE).rglob("*.py"))
    }
    graph: Dict[str, Set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            targets: List[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                for alias in node.names:
                    full = f"{node.module}.{alias.name}"
                    targets.append(full if full in modules else node.module)
            for target in targets:
                if target.startswith(PACKAGE) and target in modules and target != name:
                    graph[name].add(target)
    return graph


def cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    found: List[List[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in sorted(graph[node]):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def main() -> int:
    src = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parents[1] / "src"
    graph = arrows(src)
    n_arrows = sum(len(targets) for targets in graph.values())
    found = cycles(graph)
    up = sorted(
        (name, target)
        for name, targets in graph.items()
        for target in targets
        if layer(target) > layer(name)
    )
    unknown = sorted(name for name in graph if layer(name) < 0)
    print(
        f"{len(graph)} files, {n_arrows} import arrows, {len(found)} cycles, "
        f"{len(up)} arrows up"
    )
    for component in found:
        print("cycle: " + " <-> ".join(component))
    for name, target in up:
        print(f"arrow up: {name} -> {target}")
    for name in unknown:
        print(f"not in a layer: {name}")
    return 1 if found or up or unknown else 0


if __name__ == "__main__":
    sys.exit(main())
