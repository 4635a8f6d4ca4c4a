"""The two test tiers: ``python -m pytest`` runs the fast tier (pytest.ini's addopts hold ``-m "not slow"``) and
``.ci/run`` then runs the rest (``-m slow``). Every module of ``clus_jax`` has a test in the fast tier.

Which tests are slow is read from the test files themselves (``pytestmark`` and ``@pytest.mark.slow``), and
which modules a test reaches from its imports: the file's module-level imports count for each of its tests,
an import inside a test counts for that test, and ``-m clus_jax.X`` / ``"clus_jax.X"`` in a command line
counts as running module X. ``python tests/test_tiers.py`` prints the modules each tier imports.
"""
from __future__ import annotations

import ast
import configparser
import pathlib
import shlex
import sys

TESTS = pathlib.Path(__file__).resolve().parent
ROOT = TESTS.parent
PACKAGE = "clus_jax"


def package_modules() -> set[str]:
    """Dotted names of every module of the package (``clus_jax.train.loop``; a package is its ``__init__``)."""
    names = set()
    for path in (ROOT / PACKAGE).rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        names.add(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def _marks(decorators: list[ast.expr]) -> set[str]:
    """Names of the ``pytest.mark.X`` decorators (called or not)."""
    out = set()
    for d in decorators:
        node = d.func if isinstance(d, ast.Call) else d
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute) and node.value.attr == "mark":
            out.add(node.attr)
    return out


def _module_marks(tree: ast.Module) -> set[str]:
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "pytestmark" for t in node.targets):
            values = node.value.elts if isinstance(node.value, (ast.List, ast.Tuple)) else [node.value]
            return {v.attr for v in values if isinstance(v, ast.Attribute)}
    return set()


def _reached(node: ast.AST, known: set[str]) -> set[str]:
    """Package modules that ``node`` imports, or runs as ``-m clus_jax.X`` / names as a "clus_jax.X" string."""
    out, commands = set(), set()
    docstrings = {id(n.value) for n in ast.walk(node) if isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant)}
    for sub in ast.walk(node):
        if isinstance(sub, ast.Import):
            out.update(a.name for a in sub.names)
        elif isinstance(sub, ast.ImportFrom) and sub.module and sub.level == 0:
            out.add(sub.module)
            out.update(f"{sub.module}.{a.name}" for a in sub.names)
        elif (isinstance(sub, ast.Constant) and isinstance(sub.value, str) and PACKAGE in sub.value
              and id(sub) not in docstrings):
            commands.update(word.split(":")[0] for word in sub.value.split())
    out |= commands | {f"{name}.__main__" for name in commands}  # "-m clus_jax.train" runs train/__main__.py
    reached = set()
    for name in out:
        while name:  # importing clus_jax.a.b runs clus_jax.a and clus_jax too; count the deepest known module
            if name in known:
                reached.add(name)
                break
            name = name.rpartition(".")[0]
    return reached


def tiers() -> dict[str, dict[str, set[str]]]:
    """{'fast': {test file: modules}, 'slow': {...}}: the modules each tier's tests reach, by test file."""
    known = package_modules()
    result: dict[str, dict[str, set[str]]] = {"fast": {}, "slow": {}}
    for path in sorted(TESTS.rglob("test_*.py")):
        tree = ast.parse(path.read_text())
        file_marks = _module_marks(tree)
        top = ast.Module(body=[n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))], type_ignores=[])
        shared = _reached(top, known)
        tests = [(n, set()) for n in tree.body if isinstance(n, ast.FunctionDef) and n.name.startswith("test")]
        for cls in (n for n in tree.body if isinstance(n, ast.ClassDef) and n.name.startswith("Test")):
            tests += [(n, _marks(cls.decorator_list)) for n in cls.body
                      if isinstance(n, ast.FunctionDef) and n.name.startswith("test")]
        # Fixtures and helpers of the file serve its tests: what they reach counts for every test of the file.
        helpers = [n for n in tree.body if isinstance(n, ast.FunctionDef) and not n.name.startswith("test")]
        shared |= set().union(*(_reached(h, known) for h in helpers)) if helpers else set()
        rel = str(path.relative_to(ROOT))
        for fn, class_marks in tests:
            tier = "slow" if "slow" in (file_marks | class_marks | _marks(fn.decorator_list)) else "fast"
            result[tier].setdefault(rel, set()).update(shared | _reached(fn, known))
    return result


def test_fast_tier_is_what_pytest_ini_selects():
    ini = configparser.ConfigParser()
    ini.read(ROOT / "pytest.ini")
    addopts = shlex.split(ini["pytest"]["addopts"])
    assert addopts[addopts.index("-m") + 1] == "not slow", addopts
    ci = (ROOT / ".ci" / "run").read_text()
    assert "python -m pytest -m slow" in ci and "python -m pytest  #" in ci


def package_imports() -> dict[str, set[str]]:
    """Module -> the package modules it imports (module-level and inside functions, as a test that calls into
    it would run them)."""
    known = package_modules()
    out = {}
    for name in known:
        path = ROOT / (name.replace(".", "/") + ".py")
        if not path.exists():
            path = ROOT / name.replace(".", "/") / "__init__.py"
        tree = ast.parse(path.read_text())
        imported = set()
        for sub in ast.walk(tree):
            if isinstance(sub, ast.ImportFrom) and sub.level:  # relative: from . import x
                base = name if path.name == "__init__.py" else name.rpartition(".")[0]
                for _ in range(sub.level - 1):
                    base = base.rpartition(".")[0]
                mod = f"{base}.{sub.module}" if sub.module else base
                imported |= {mod} | {f"{mod}.{a.name}" for a in sub.names}
        out[name] = (_reached(tree, known) | {m for m in imported if m in known}) - {name}
    return out


def closure(modules: set[str], graph: dict[str, set[str]]) -> set[str]:
    """``modules`` and everything they import, transitively."""
    seen, todo = set(), list(modules)
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo.extend(graph.get(m, ()))
            parent = m.rpartition(".")[0]  # importing a.b runs a/__init__.py first
            if parent:
                todo.append(parent)
    return seen


def test_every_module_has_a_test_in_the_fast_tier():
    direct = set().union(*tiers()["fast"].values())
    missing = sorted(package_modules() - closure(direct, package_imports()))
    assert not missing, f"modules no fast-tier test imports or runs, directly or through the package: {missing}"


def test_the_reader_sees_imports_commands_and_marks(tmp_path):
    """The static reader counts what it should: a planted slow-only import is not fast-tier coverage."""
    known = package_modules()
    tree = ast.parse('import subprocess\nfrom clus_jax.objectives import contrastive\n'
                     'def test_a():\n    from clus_jax.train import loop\n'
                     '    subprocess.run(["python", "-m", "clus_jax.cluster", "--k", "2"])\n')
    assert _reached(tree, known) == {"clus_jax.objectives", "clus_jax.objectives.contrastive", "clus_jax.train",
                                     "clus_jax.train.loop", "clus_jax.cluster"}
    command = ast.parse('import subprocess\nsubprocess.run(["python", "-m", "clus_jax.train", "--config", "x"])\n')
    assert _reached(command, known) == {"clus_jax.train", "clus_jax.train.__main__"}
    slow = ast.parse("import pytest\n@pytest.mark.slow\ndef test_b():\n    pass\n").body[1]
    assert _marks(slow.decorator_list) == {"slow"}
    assert _module_marks(ast.parse("import pytest\npytestmark = [pytest.mark.slow, pytest.mark.multiprocess]\n")) == {
        "slow", "multiprocess"}


if __name__ == "__main__":
    found, graph = tiers(), package_imports()
    everything = package_modules()
    for tier in ("fast", "slow"):
        direct = set().union(*found[tier].values())
        reached = closure(direct, graph)
        print(f"{tier} tier: {len(found[tier])} test files import or run {len(direct)} modules directly and reach "
              f"{len(reached)} of {len(everything)}")
        for name in sorted(reached):
            print("   ", name, "" if name in direct else "(through the package)")
    missing = sorted(everything - closure(set().union(*found["fast"].values()), graph))
    print("not in the fast tier:", missing or "none")
    sys.exit(1 if missing else 0)
