"""The package's layers import only downward, with no cycle (README "Layout").

Every import of ``clus_jax`` modules is read from the source (``ast``), imports inside functions included, so a
lazy import that runs upward fails here as surely as a top-level one. A layer is a folder (or top-level module)
of the package; commands are the top-level command modules and every ``__main__``. Inside the library:

- a module imports only from its own layer or a lower one, never from a command or the package ``__init__``;
- ``clustering``, ``objectives`` and ``evaluate`` share a level and do not import each other, except
  ``evaluate`` -> ``clustering`` (cluster quality);
- no import cycle, between modules or between layers.
"""
from __future__ import annotations

import ast
import os
import textwrap


import clus_jax

PACKAGE = os.path.dirname(clus_jax.__file__)

# Lowest first. A name is a folder of clus_jax/ or a top-level module; names in one tuple share a level.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("common",),
    ("parallel",),
    ("data",),
    ("models",),
    ("clustering", "objectives", "evaluate"),
    ("config",),
    ("inference",),
    ("interop",),
    ("train",),
)
# Sideways imports allowed inside a shared level (importer -> imported).
SIDEWAYS = {("evaluate", "clustering")}
# The commands: thin entry points over the library, nothing in the library imports them.
COMMANDS = ("embed", "cluster", "experts", "ensemble", "recipe", "sweep", "plan", "report")


def module_name(root: str, path: str) -> str:
    rel = os.path.relpath(path, os.path.dirname(root))[: -len(".py")].replace(os.sep, ".")
    return rel[: -len(".__init__")] if rel.endswith(".__init__") else rel


def imports_of(root: str) -> dict[str, set[str]]:
    """module -> the package modules it imports (``from a import b`` counts ``a.b`` when ``b`` is a module)."""
    modules = {}
    for folder, _, names in os.walk(root):
        for n in names:
            if n.endswith(".py"):
                modules[module_name(root, os.path.join(folder, n))] = os.path.join(folder, n)
    top = os.path.basename(root)
    graph: dict[str, set[str]] = {}
    for mod, path in modules.items():
        is_pkg = path.endswith("__init__.py")
        out: set[str] = set()
        for node in ast.walk(ast.parse(open(path).read(), path)):
            if isinstance(node, ast.Import):
                out.update(a.name for a in node.names if a.name.split(".")[0] == top)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = mod.split(".") if is_pkg else mod.split(".")[:-1]
                    base = base[: len(base) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                if target.split(".")[0] != top:
                    continue
                for a in node.names:
                    out.add(f"{target}.{a.name}" if f"{target}.{a.name}" in modules else target)
        graph[mod] = {m for m in out if m != mod}
    return graph


def layer_of(module: str) -> str | None:
    """'clus_jax.data.pipeline' -> 'data'; the package ``__init__`` -> None."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def is_command(module: str) -> bool:
    return module.endswith(".__main__") or layer_of(module) in COMMANDS


def level(layer: str) -> int:
    for i, names in enumerate(LAYERS):
        if layer in names:
            return i
    raise KeyError(f"{layer!r} is in no layer: add it to LAYERS or COMMANDS in tests/test_layers.py")


def violations(graph: dict[str, set[str]]) -> list[str]:
    """Every import that runs upward, sideways against the order, into a command or into the package root."""
    bad = []
    for mod, targets in sorted(graph.items()):
        if is_command(mod) or layer_of(mod) is None:
            continue
        for t in sorted(targets):
            src, dst = layer_of(mod), layer_of(t)
            if dst is None or is_command(t):
                bad.append(f"{mod} -> {t} (the library imports a command or the package root)")
            elif src != dst and (level(dst) > level(src) or (level(dst) == level(src) and (src, dst) not in SIDEWAYS)):
                bad.append(f"{mod} -> {t} ({src} may not import {dst})")
    return bad


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in graph:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_every_folder_and_module_is_in_a_layer_or_a_command():
    names = {layer_of(m) for m in imports_of(PACKAGE)} - {None}
    declared = {n for names_ in LAYERS for n in names_} | set(COMMANDS)
    assert names <= declared, f"not placed in LAYERS or COMMANDS: {sorted(names - declared)}"


def test_the_package_imports_only_downward():
    assert violations(imports_of(PACKAGE)) == []


def test_the_package_has_no_import_cycle():
    assert cycles(imports_of(PACKAGE)) == []


def _package(tmp_path, files: dict[str, str]) -> str:
    root = tmp_path / "clus_jax"
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(textwrap.dedent(text))
    return str(root)


def test_a_planted_upward_import_inside_a_function_fails(tmp_path):
    root = _package(tmp_path, {
        "__init__.py": "", "data/__init__.py": "", "train/__init__.py": "", "train/loop.py": "",
        "data/pipeline.py": "def f():\n    from clus_jax.train import loop\n",
    })
    assert violations(imports_of(root)) == ["clus_jax.data.pipeline -> clus_jax.train.loop (data may not import train)"]


def test_planted_sideways_command_and_root_imports_fail(tmp_path):
    root = _package(tmp_path, {
        "__init__.py": "", "objectives/__init__.py": "", "evaluate/__init__.py": "", "clustering/__init__.py": "",
        "objectives/swap.py": "from ..evaluate import metrics\n", "evaluate/metrics.py": "",
        "evaluate/cluster_eval.py": "from clus_jax.clustering import quality\n", "clustering/quality.py": "",
        "train/__init__.py": "", "train/loop.py": "import clus_jax\nfrom clus_jax import report\n", "report.py": "",
    })
    assert violations(imports_of(root)) == [
        "clus_jax.objectives.swap -> clus_jax.evaluate.metrics (objectives may not import evaluate)",
        "clus_jax.train.loop -> clus_jax (the library imports a command or the package root)",
        "clus_jax.train.loop -> clus_jax.report (the library imports a command or the package root)",
    ]


def test_a_planted_cycle_fails(tmp_path):
    root = _package(tmp_path, {
        "__init__.py": "", "clustering/__init__.py": "",
        "clustering/kmeans.py": "from clus_jax.clustering.balanced import auction\n",
        "clustering/balanced.py": "def auction():\n    from clus_jax.clustering import kmeans\n",
    })
    assert violations(imports_of(root)) == []
    assert cycles(imports_of(root)) == [["clus_jax.clustering.balanced", "clus_jax.clustering.kmeans"]]


if __name__ == "__main__":
    g = imports_of(PACKAGE)
    print("\n".join(violations(g)) or "no upward import")
    print("\n".join(" <-> ".join(c) for c in cycles(g)) or "no cycle")
