"""Every import path README.md documents exists: ``from clus_jax.X import a, b`` and ``import clus_jax.X``
lines, ``clus_jax.X.name`` references in backticks and code blocks, what a code block reaches through a name it
imported from clus_jax (``interop.save_open_clip``), and the functions a paragraph lists after a
``clus_jax.M.f(...)`` reference (in "`clus_jax.objectives.clip_loss(...)`, `siglip_loss(...)`" the second is
``clus_jax.objectives.siglip_loss``)."""
from __future__ import annotations

import importlib
import inspect
import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"
FENCE = re.compile(r"^\s*```[^\n]*\n(.*?)^\s*```", re.M | re.S)
SPAN = re.compile(r"`([^`]+)`")
DOTTED = re.compile(r"(?<![\w./-])clus_jax(?:\.\w+)+")
FROM_IMPORT = re.compile(r"^\s*from (clus_jax(?:\.\w+)*) import \(?([\w\s,]+?)\)?\s*(?:#.*)?$", re.M)
IMPORT = re.compile(r"^\s*import (clus_jax(?:\.\w+)*)(?: as (\w+))?\s*(?:#.*)?$", re.M)


def called_name(span: str) -> str | None:
    """``f`` of a span that is exactly one call ``f(...)`` (dots allowed in ``f``), else None."""
    match = re.match(r"([A-Za-z_][\w.]*)\(", span)
    if not match:
        return None
    depth = 0
    for i in range(match.end() - 1, len(span)):
        depth += {"(": 1, ")": -1}.get(span[i], 0)
        if depth == 0:
            return match.group(1) if i == len(span) - 1 else None
    return None


def imports(code: str) -> dict[str, str]:
    """{name bound in ``code``: the clus_jax path it stands for} of its clus_jax import lines."""
    bound = {}
    for module, names in FROM_IMPORT.findall(code):
        for item in filter(None, (n.strip() for n in names.replace("\n", " ").split(","))):
            name, _, alias = item.partition(" as ")
            bound[alias.strip() or name.strip()] = f"{module}.{name.strip()}"
    for module, alias in IMPORT.findall(code):
        bound[alias or module.split(".")[0]] = module if alias else module.split(".")[0]
    return bound


def listed_functions(paragraph: str) -> set[str]:
    """The calls a paragraph lists after a ``clus_jax.M.f(...)`` span, as ``clus_jax.M.g``."""
    out, module = set(), None
    for span in SPAN.findall(paragraph):
        name = called_name(" ".join(span.split()))
        if name is None:
            continue
        if name.startswith("clus_jax."):
            module = name.rpartition(".")[0]
        elif module and "." not in name:
            out.add(f"{module}.{name}")
    return out


def documented(text: str) -> set[str]:
    """Every clus_jax path README text documents."""
    paths = set()
    for block in FENCE.findall(text):
        bound = imports(block)
        paths.update(bound.values())
        paths.update(DOTTED.findall(block))
        for name, path in bound.items():
            paths.update(f"{path}.{attr}" for attr in re.findall(rf"(?<![\w.]){re.escape(name)}\.(\w+)", block))
    prose = FENCE.sub("", text)
    for paragraph in re.split(r"\n\s*\n", prose):
        paths.update(listed_functions(paragraph))
        for span in SPAN.findall(paragraph):
            paths.update(DOTTED.findall(span))
            paths.update(imports(span).values())
    return paths


def resolve(path: str) -> object:
    """The object at a dotted path: attributes, or submodules imported as needed."""
    parts = path.split(".")
    obj = importlib.import_module(parts[0])
    for i, part in enumerate(parts[1:], start=2):
        if not hasattr(obj, part) and inspect.ismodule(obj):
            try:
                importlib.import_module(".".join(parts[:i]))
            except ModuleNotFoundError as e:
                if e.name != ".".join(parts[:i]):
                    raise
        obj = getattr(obj, part)
    return obj


PATHS = sorted(documented(README.read_text(encoding="utf-8")))
OBJECTIVES = ["clip_loss", "siglip_loss", "clip_reg_loss", "sinkhorn_knopp", "swapped_prediction_loss", "moco_loss",
              "brivl_loss", "enqueue", "momentum_update", "mlcd_loss", "margin_softmax_loss", "sample_negatives"]


def test_the_readme_is_read_whole():
    """The parser finds each kind of reference (a test of the test: a regex that stops matching fails here)."""
    assert {f"clus_jax.objectives.{name}" for name in OBJECTIVES} <= set(PATHS)
    assert {"clus_jax.load", "clus_jax.interop.save_open_clip", "clus_jax.config.base.parse_arg",
            "clus_jax.recipe.Stage", "clus_jax.train.experiment.build", "clus_jax.cluster"} <= set(PATHS)


@pytest.mark.parametrize("path", PATHS)
def test_documented_path_exists(path):
    try:
        resolve(path)
    except (ImportError, AttributeError) as e:
        pytest.fail(f"README.md documents {path}, which does not exist: {e}")


def test_documented_objectives_are_explicit_reexports():
    """``from clus_jax.objectives import moco_loss, ...`` works, and each README name is in its ``__all__``."""
    objectives = importlib.import_module("clus_jax.objectives")
    listed = {p.rpartition(".")[2] for p in PATHS if p.rpartition(".")[0] == "clus_jax.objectives"}
    listed -= {name for name in listed if inspect.ismodule(resolve(f"clus_jax.objectives.{name}"))}
    assert set(OBJECTIVES) <= listed and listed <= set(objectives.__all__), sorted(listed - set(objectives.__all__))
    namespace = {}
    exec("from clus_jax.objectives import *", namespace)
    assert set(objectives.__all__) <= set(namespace)
