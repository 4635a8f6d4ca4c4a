"""The arrays of one evaluation on disk: ``<workdir>/eval/step_<N>/``, written at every evaluation.

- ``confusion_<set>.npz`` per zero-shot set: ``confusion`` int64 [C, C] (row = true class, column =
  prediction), ``per_class_accuracy`` float64 [C] (NaN for an absent class), ``classnames`` str [C];
- ``pca_<set>.npz`` per zero-shot set: ``projection`` float32 [N, 2] (image embeddings on their first two
  principal axes), ``explained_variance`` [2], ``labels`` int64 [N], ``classnames`` str [C];
- ``metrics.json``: the evaluation's scalars (the same names and values as its line in ``metrics.jsonl``);
- ``benchmarks/<entry>.json`` per entry that reports one (``benchmarks`` evaluators): CLIP_benchmark's result
  keys ``dataset``, ``model``, ``pretrained``, ``task``, ``metrics``, ``language``, plus ``decode_errors``.

All files load with ``np.load(path)`` (no pickle). Paths may be local or ``gs://``.
"""
from __future__ import annotations

import io
import json
import math
import re
from collections.abc import Mapping

import numpy as np
from etils import epath

from clus_jax.evaluate.runner import ClassArrays, Evaluation

EVAL_DIR = "eval"
REPORTS_DIR = "benchmarks"
_STEP_DIR = re.compile(r"^step_(\d+)$")


def step_dir(workdir: str, step: int) -> epath.Path:
    return epath.Path(workdir) / EVAL_DIR / f"step_{int(step)}"


def steps(workdir: str) -> list[int]:
    """The steps that have an evaluation directory, ascending."""
    root = epath.Path(workdir) / EVAL_DIR
    if not root.is_dir():
        return []
    found = (_STEP_DIR.match(p.name) for p in root.iterdir())
    return sorted(int(m.group(1)) for m in found if m)


def _write_npz(path: epath.Path, **arrays: np.ndarray) -> None:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    path.write_bytes(buffer.getvalue())


def _read_npz(path: epath.Path) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(path.read_bytes()), allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


def write(evaluation: Evaluation, directory: str | epath.Path, *, model: str = "", pretrained: str = "") -> None:
    """Saves an evaluation's arrays, scalars and reports under ``directory`` (created; existing files replaced).
    ``model``/``pretrained``: what the reports name as CLIP_benchmark's ``model`` and ``pretrained``."""
    directory = epath.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if evaluation.reports:
        (directory / REPORTS_DIR).mkdir(exist_ok=True)
    for entry, report in evaluation.reports.items():
        full = {"dataset": report["dataset"], "model": model, "pretrained": pretrained, "task": report["task"],
                "metrics": report["metrics"], "language": "en", **report}
        (directory / REPORTS_DIR / f"{entry}.json").write_text(json.dumps(full, indent=1) + "\n")
    for name, a in evaluation.arrays.items():
        names = np.asarray(a.classnames, dtype=str)
        _write_npz(directory / f"confusion_{name}.npz", confusion=a.confusion,
                   per_class_accuracy=a.per_class_accuracy, classnames=names)
        _write_npz(directory / f"pca_{name}.npz", projection=a.projection,
                   explained_variance=a.explained_variance, labels=a.labels, classnames=names)
    finite = {k: (v if math.isfinite(v) else None) for k, v in evaluation.metrics.items()}
    (directory / "metrics.json").write_text(json.dumps(finite, indent=1) + "\n")


def read(directory: str | epath.Path) -> dict[str, ClassArrays]:
    """The ``ClassArrays`` saved under ``directory``, by set name."""
    directory = epath.Path(directory)
    out = {}
    for path in sorted(directory.glob("confusion_*.npz")):
        name = path.name[len("confusion_"):-len(".npz")]
        conf = _read_npz(path)
        pca_path = directory / f"pca_{name}.npz"
        pca = _read_npz(pca_path) if pca_path.exists() else {}
        out[name] = ClassArrays(
            classnames=[str(c) for c in conf["classnames"]], confusion=conf["confusion"],
            per_class_accuracy=conf["per_class_accuracy"],
            projection=pca.get("projection", np.zeros((0, 2), np.float32)),
            explained_variance=pca.get("explained_variance", np.zeros(2)),
            labels=pca.get("labels", np.zeros(0, np.int64)))
    return out


def read_metrics(directory: str | epath.Path) -> Mapping[str, float | None]:
    return json.loads((epath.Path(directory) / "metrics.json").read_text())
