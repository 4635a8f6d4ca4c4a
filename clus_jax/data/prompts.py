"""Class names and prompt templates for zero-shot classification: CLIP_benchmark's standard sets, and which of
the settings, the prompt set and the data's own lists an evaluator uses.

``load_prompt_set('clip_benchmark:<dataset>')`` reads CLIP_benchmark's English lists (``en_classnames.json``,
``en_zeroshot_classification_templates.json``; MIT). They are not part of the repository; they are found in:

1. an installed ``clip_benchmark`` package, located without importing it (importing it imports torch);
2. the cache directory, ``$CLUS_JAX_CACHE/clip_benchmark-1.6.2`` (default ``~/.cache/clus_jax``);
3. the ``clip-benchmark==1.6.2`` wheel fetched from the package index with pip (no dependencies), from which
   the two files are extracted into the cache and checked against pinned sha256s.

Templates come back with ``{}`` for the class name (CLIP_benchmark writes ``{c}``).
"""
from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

from absl import logging

from clus_jax.common.cache import cache_dir, fetch_wheel_files, package_dir
from clus_jax.data.eval_data import check_templates, normalize_template, read_lines

CLIP_BENCHMARK_REQUIREMENT = "clip-benchmark==1.6.2"
CLIP_BENCHMARK_CACHE = "clip_benchmark-1.6.2"
CLASSNAMES_FILE = "en_classnames.json"
TEMPLATES_FILE = "en_zeroshot_classification_templates.json"
# sha256 of the two files in clip_benchmark-1.6.2-py2.py3-none-any.whl.
CLIP_BENCHMARK_FILES = {
    CLASSNAMES_FILE: "73d279021a4bc88059884d01fae66c35ec33793ede8bc9ae54c46632625c4993",
    TEMPLATES_FILE: "b78cc883ce1d6aefd304f180046ee25e778d627e099222fbcc57f01657c53c31",
}
WHEEL_FOLDER = "clip_benchmark/datasets/"
DEFAULT_TEMPLATES = ("a photo of a {}.",)
SOURCES = ("clip_benchmark",)


@dataclasses.dataclass
class PromptSet:
    """A dataset's standard class names and templates (None where the set has none), and where they came from."""

    classnames: list[str] | None
    templates: list[str] | None
    source: str


def clip_benchmark_files(download: Callable[[Path], str | Path] | None = None) -> dict[str, Path]:
    """File name -> path of CLIP_benchmark's two English json files, from the sources in the module docstring."""
    installed = package_dir("clip_benchmark")
    if installed is not None and all((installed / "datasets" / f).is_file() for f in CLIP_BENCHMARK_FILES):
        return {f: installed / "datasets" / f for f in CLIP_BENCHMARK_FILES}
    folder = cache_dir() / CLIP_BENCHMARK_CACHE
    if not all((folder / f).is_file() for f in CLIP_BENCHMARK_FILES):
        logging.warning("CLIP_benchmark prompts: fetching %s from the package index into %s",
                        CLIP_BENCHMARK_REQUIREMENT, folder)
    paths = fetch_wheel_files(CLIP_BENCHMARK_REQUIREMENT,
                              {WHEEL_FOLDER + f: (folder / f, sha) for f, sha in CLIP_BENCHMARK_FILES.items()},
                              download=download)
    return {f: paths[WHEEL_FOLDER + f] for f in CLIP_BENCHMARK_FILES}


def load_prompt_set(spec: str, *, download: Callable[[Path], str | Path] | None = None) -> PromptSet:
    """The prompt set ``spec`` names: ``'clip_benchmark:<dataset>'`` (e.g. ``clip_benchmark:imagenet1k``).

    ValueError for a malformed spec or a dataset CLIP_benchmark has no list for (naming the ones it has).
    """
    source, sep, dataset = str(spec).partition(":")
    if not sep or source not in SOURCES or not dataset:
        raise ValueError(f"prompt set {spec!r} must be SOURCE:DATASET with SOURCE one of {list(SOURCES)} "
                         "(e.g. 'clip_benchmark:imagenet1k')")
    tables = {}
    for name, path in clip_benchmark_files(download).items():
        with open(path, encoding="utf-8") as f:
            tables[name] = json.load(f)
    names, templates = tables[CLASSNAMES_FILE].get(dataset), tables[TEMPLATES_FILE].get(dataset)
    if names is None and templates is None:
        known = sorted(set(tables[CLASSNAMES_FILE]) | set(tables[TEMPLATES_FILE]))
        raise ValueError(f"prompt set {spec!r}: CLIP_benchmark has no class names or templates for {dataset!r}; "
                         f"known: {', '.join(known)}")
    return PromptSet(classnames=None if names is None else [str(n) for n in names],
                     templates=None if templates is None else [normalize_template(t) for t in templates],
                     source=spec)


def _listed(value: str | os.PathLike | Sequence[str] | None, where: str) -> list[str] | None:
    """A setting given as a list, or as the path of a text file with one entry per line."""
    if value is None:
        return None
    if isinstance(value, (str, os.PathLike)):
        if not os.path.isfile(os.path.expanduser(os.fspath(value))):
            raise ValueError(f"{where}: {os.fspath(value)!r} is not a file (give a list or a text file, "
                             "one entry per line)")
        return read_lines(os.fspath(value))
    return [str(v) for v in value]


def resolve(classnames: str | os.PathLike | Sequence[str] | None, templates: str | os.PathLike | Sequence[str] | None,
            prompts: PromptSet | str | None, data_classnames: Sequence[str] | None,
            data_templates: Sequence[str] | None, where: str) -> tuple[list[str], list[str]]:
    """The class names and templates a zero-shot evaluator uses.

    Names: the ``classnames`` setting (a list or a text file) > the prompt set's > the data's own. Templates:
    the ``templates`` setting > the prompt set's > the data's own > ``['a photo of a {}.']``; ``{c}`` is read as
    ``{}``. ``prompts``: a PromptSet or its spec. ``where``: the evaluator's config entry (e.g.
    ``config.evals.mnist``); a ValueError names its key (``config.evals.mnist.classnames``) when there are no
    names, a list file is missing, a template lacks ``{}`` or the prompt set is unknown.
    """
    if isinstance(prompts, str):
        try:
            prompts = load_prompt_set(prompts)
        except ValueError as e:
            raise ValueError(f"{where}.prompts: {e}") from None
    prompt_names, prompt_templates = (prompts.classnames, prompts.templates) if prompts else (None, None)
    names = next((n for n in (_listed(classnames, f"{where}.classnames"), prompt_names, data_classnames) if n),
                 None)
    if not names:
        raise ValueError(f"{where}.classnames: no class names; give a list or a text file (one per line), a "
                         "prompt set with names, or data that names its classes")
    chosen = next((t for t in (_listed(templates, f"{where}.templates"), prompt_templates, data_templates) if t),
                  list(DEFAULT_TEMPLATES))
    return [str(n) for n in names], check_templates(chosen, f"{where}.templates")
