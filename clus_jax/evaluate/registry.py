"""The seam every evaluation plugs into: evaluators registered by name, run by the entries of ``config.evals``.

Every dict-valued key of ``config.evals`` is an entry: ``config.evals.<entry> = {'type': <evaluator>, ...}``
with the evaluator's settings (merged over its ``defaults``); scalar keys are shared by all entries
(``batch_size``: the encoders' batch). ``config.evals.run`` names the entries that run, comma-separated
(``''`` or ``'none'``: no evaluation), so one flag switches them. Every entry may set ``every`` (steps between its
runs during training; 0 or absent: ``config.eval_every``); all of them run after the last step. The trainer and
the re-evaluation build one ``EvalContext`` per evaluation and never ask which evaluator is running.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import ml_collections
import numpy as np

from clus_jax.common.errors import ConfigError
from clus_jax.evaluate.runner import Evaluation

#: The keys of ``config.evals`` that are no entry.
SHARED = ("run", "batch_size")
#: Keys of an entry's settings that are no evaluator setting: the evaluator, the entry's own name, its schedule.
RESERVED = ("type", "entry", "every")


@dataclasses.dataclass(frozen=True)
class EvalContext:
    """Everything an evaluator may read.

    encode_images / encode_texts: the run's encoders, uint8 [n, H, W, 3] -> [n, D] and list[str] -> [n, D]
        (fixed-size padded batches, every host alike: call them with the same inputs on every process).
    modalities: the towers the run has ('image', 'text'); an encoder of a missing tower must not be called.
    heads: the objectives' cluster heads, name -> [K, D] host arrays (``Objective.eval_heads``), scored as
        clusterings (each embedding's arg-max row).
    config: the run's config.
    image_rows / batch_size: the streamed image encoder (``encoders.Encoders.image_rows``): this process's rows
        of one global batch of ``batch_size`` in, the whole batch's embeddings out. None: built from
        ``encode_images`` for one process (``row_encoder``).
    """

    encode_images: Callable[[np.ndarray], np.ndarray]
    encode_texts: Callable[[list[str]], np.ndarray]
    modalities: tuple[str, ...]
    heads: Mapping[str, np.ndarray]
    config: ml_collections.ConfigDict
    image_rows: Callable | None = None
    batch_size: int = 256

    def row_encoder(self) -> Callable:
        """``image_rows``, or for one process the same contract over ``encode_images``."""
        if self.image_rows is not None:
            return self.image_rows
        return lambda images, valid, labels: (np.asarray(self.encode_images(images)), np.asarray(valid, bool),
                                              np.asarray(labels, np.int32))


class Evaluator:
    """Base class: subclasses set ``name`` and implement ``run``; ``validate`` defaults to a no-op."""

    name: str = ""
    #: Default settings; an entry's own keys override them.
    defaults: dict[str, Any] = {}

    def validate(self, settings: ml_collections.ConfigDict, config: ml_collections.ConfigDict) -> None:
        """Raises ConfigError naming the key ``config.evals.<settings.entry>.<key>`` when a setting cannot work."""

    def run(self, settings: ml_collections.ConfigDict, ctx: EvalContext) -> Evaluation:
        """Returns the flat metrics ``{name: float}`` (names unique across the entries that run) and, optionally,
        arrays for the report (``Evaluation.arrays``: ``runner.ClassArrays`` by set name)."""
        raise NotImplementedError


_REGISTRY: dict[str, Evaluator] = {}


def register(evaluator_cls: type[Evaluator]) -> type[Evaluator]:
    """Class decorator: makes an evaluator available as ``config.evals.<entry>.type``."""
    instance = evaluator_cls()
    if not instance.name:
        raise ValueError(f"{evaluator_cls.__name__} has no name")
    if set(instance.defaults) & set(RESERVED):
        raise ValueError(f"{evaluator_cls.__name__}.defaults may not use the keys {list(RESERVED)}")
    _REGISTRY[instance.name] = instance
    return evaluator_cls


def names() -> list[str]:
    """The registered evaluators, the built-in ones included."""
    _load_builtin()
    return sorted(_REGISTRY)


def get(name: str) -> Evaluator:
    """The evaluator registered as ``name``; ConfigError listing the known ones when there is none."""
    known = names()
    if name not in known:
        raise ConfigError(f"unknown evaluator {name!r}; known: {known}")
    return _REGISTRY[name]


def entries(config: ml_collections.ConfigDict) -> dict[str, ml_collections.ConfigDict]:
    """The entries of ``config.evals``: its dict-valued keys, by name."""
    return entries_in(config.evals)


def entries_in(evals: Mapping[str, Any]) -> dict[str, ml_collections.ConfigDict]:
    """The entries of an evals mapping (``config.evals`` or a suite): its dict-valued keys, by name."""
    return {k: v for k, v in evals.items() if isinstance(v, (dict, ml_collections.ConfigDict))}


def run_names(config: ml_collections.ConfigDict) -> list[str]:
    """The entries ``config.evals.run`` names, in order; [] for ``''`` or ``'none'``."""
    run = str(config.evals.get("run", "") or "").strip()
    return [] if run == "none" else [n.strip() for n in run.split(",") if n.strip()]


def settings(config: ml_collections.ConfigDict, entry: str) -> ml_collections.ConfigDict:
    """Entry ``entry``'s settings: its evaluator's defaults, then its own keys, plus ``entry`` (its name)."""
    own = dict(entries(config)[entry])
    return ml_collections.ConfigDict({**get(own["type"]).defaults, **own, "entry": entry})


def every(config: ml_collections.ConfigDict, entry: str) -> int:
    """Steps between the runs of ``entry`` during training: its ``every``, else ``config.eval_every`` (0: never
    before the last step)."""
    own = entries(config)[entry].get("every", 0)
    return int(own or config.get("eval_every", 0) or 0)


def due(config: ml_collections.ConfigDict, step: int, *, last: bool = False) -> list[str]:
    """The entries of ``config.evals.run`` that run at ``step``: all of them after the last step (``last``),
    else those whose ``every`` divides ``step``."""
    names = run_names(config)
    if last:
        return names
    return [n for n in names if every(config, n) and step % every(config, n) == 0]


def run(config: ml_collections.ConfigDict, ctx: EvalContext, names: list[str] | None = None) -> Evaluation:
    """Runs the entries ``names`` (default: every entry of ``config.evals.run``) in order; their metrics, arrays
    and reports together."""
    metrics: dict[str, float] = {}
    arrays: dict = {}
    reports: dict = {}
    for entry in run_names(config) if names is None else names:
        own = settings(config, entry)
        out = get(own.type).run(own, ctx)
        again = sorted((set(out.metrics) & set(metrics)) | (set(out.arrays) & set(arrays)))
        if again:
            raise ConfigError(f"config.evals.run={config.evals.run!r}: entry {entry!r} gives {again[:3]} again, "
                              "which an earlier entry gave")
        metrics.update({k: float(v) for k, v in out.metrics.items()})
        arrays.update(out.arrays)
        reports.update(out.reports)
    return Evaluation(metrics=metrics, arrays=arrays, reports=reports)


def _load_builtin() -> None:
    # Importing the modules registers their evaluators; kept lazy to avoid import cycles.
    import importlib

    for module in BUILTIN_MODULES:
        importlib.import_module(module)


BUILTIN_MODULES = ["clus_jax.evaluate.embedded", "clus_jax.evaluate.benchmarks"]
