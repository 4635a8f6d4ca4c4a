"""A run as the report reads it: every metric of ``<workdir>/metrics.jsonl`` as a series over steps, and the
arrays of the newest ``<workdir>/eval/step_<N>/`` (``clus_jax.evaluate.artifacts``)."""
from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence

import numpy as np
from etils import epath

#: Keys of a metrics line that are bookkeeping, not results: the x axis and how long an evaluation took.
BOOKKEEPING = ("step", "eval/seconds")


@dataclasses.dataclass
class Run:
    """One workdir as the report reads it."""

    name: str
    workdir: str
    series: dict[str, tuple[np.ndarray, np.ndarray]]  # metric -> (steps, values), one finite value per step
    logged: set[str]  # every key its metrics.jsonl holds but ``step``, with a finite value or not
    eval_step: int | None  # the newest evaluation with saved arrays
    arrays: dict  # set name -> evaluate.runner.ClassArrays of that evaluation


def is_number(v: object) -> bool:
    """A finite int or float (a bool, a string, None or NaN is not drawn)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def series(records: Sequence[dict]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per metric, its finite values by step (a step logged twice keeps its newest value)."""
    by_key: dict[str, dict[int, float]] = {}
    for r in records:
        for k, v in r.items():
            if k not in BOOKKEEPING and is_number(v):
                by_key.setdefault(k, {})[int(r["step"])] = float(v)
    return {k: (np.array(sorted(d)), np.array([d[s] for s in sorted(d)])) for k, d in by_key.items()}


def run_names(workdirs: Sequence[str]) -> list[str]:
    """Short distinct labels: the last path component, more components where two runs would share one."""
    parts = [os.path.normpath(str(w)).rstrip("/").split("/") for w in workdirs]
    depth = 1
    while depth < max(len(p) for p in parts):
        names = ["/".join(p[-depth:]) for p in parts]
        if len(set(names)) == len(names):
            return names
        depth += 1
    return ["/".join(p) for p in parts]


def load_run(workdir: str, name: str) -> Run:
    """Reads a run's metrics and its newest evaluation arrays; a workdir without ``metrics.jsonl`` fails."""
    from clus_jax.evaluate import artifacts
    from clus_jax.train.metrics_writer import METRICS_FILE, read_metrics

    if not (epath.Path(workdir) / METRICS_FILE).exists():
        raise FileNotFoundError(f"{workdir!r} holds no metrics.jsonl (is it a run's workdir?)")
    records = read_metrics(workdir)
    steps = artifacts.steps(workdir)
    eval_step = steps[-1] if steps else None
    arrays = artifacts.read(artifacts.step_dir(workdir, eval_step)) if eval_step is not None else {}
    logged = {k for r in records for k in r if k != "step"}
    return Run(name=name, workdir=workdir, series=series(records), logged=logged, eval_step=eval_step, arrays=arrays)


def load_runs(workdirs: Sequence[str]) -> list[Run]:
    """Every workdir read, each labelled by ``run_names``."""
    return [load_run(w, n) for w, n in zip(workdirs, run_names(workdirs))]
