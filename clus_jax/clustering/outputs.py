"""A clustering's output directory (``python -m clus_jax.cluster --out OUT``): its file names, writing it once
the clustering is done, and reading it back in the stages after it (expert subsets, the ensemble, MLCD's
centres)::

    cluster.json           the arguments that decide the result (written first; a re-run must repeat them)
    centers.npy            float32 [K, D] (the fine centres with --levels)
    assignments.npy        int32 [num_records]: nearest centre of each record, -1 where it has no embedding
    sizes.npy              int64 [K] points per centre
    coarse_centers.npy, fine_to_coarse.npy, coarse_assignments.npy   with --levels
    outputs.json           {"files": {"<name>.npy": {"shape": [...], "dtype": "...", "what": "..."}},
                            "plot": "cluster_sizes.png", "summary": "summary.json", "side_file": DIR or null}
    cluster_sizes.png      the cluster-size distribution
    summary.json           the figures; written last, so it marks the clustering complete
    checkpoint/            orbax k-means state (a re-run after an interruption resumes from it)

The per-record arrays are side files of format (a) (``clus_jax/data/side_fields.py``); the top-l labels are a
side-file directory of their own (``topk_labels.py``).
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
from etils import epath

from clus_jax.common.files import atomic_save_npy, atomic_write_bytes, atomic_write_json
from clus_jax.data.side_fields import CENTERS_FILE, COARSE_CENTERS_FILE, FINE_TO_COARSE_FILE

SPEC_FILE = "cluster.json"
ASSIGNMENTS_FILE = "assignments.npy"
SIZES_FILE = "sizes.npy"
COARSE_ASSIGNMENTS_FILE = "coarse_assignments.npy"
OUTPUTS_FILE = "outputs.json"
PLOT_FILE = "cluster_sizes.png"
SUMMARY_FILE = "summary.json"
CHECKPOINT_DIR = "checkpoint"


def by_record(values: np.ndarray, records: np.ndarray, num_records: int, fill: int = -1) -> np.ndarray:
    """``values`` of the embedded rows spread over every record (``records``: each row's record index), ``fill``
    for the records without an embedding."""
    out = np.full((num_records, *values.shape[1:]), fill, values.dtype)
    out[records] = values
    return out


def read_summary(out: str | os.PathLike) -> dict[str, Any] | None:
    """The summary of a finished clustering in ``out``; None while it is not finished."""
    path = epath.Path(out) / SUMMARY_FILE
    return json.loads(path.read_text()) if path.exists() else None


def write(out: str | os.PathLike, arrays: Mapping[str, tuple[np.ndarray, str]], summary: Mapping[str, Any],
          plot_png: bytes, side_file: str | None = None) -> None:
    """Writes ``arrays`` (file name -> (array, what it holds)), the plot, ``outputs.json`` and, last, the summary."""
    out = epath.Path(out)
    for name, (array, _) in arrays.items():
        atomic_save_npy(out / name, array)
    atomic_write_bytes(out / PLOT_FILE, plot_png)
    files = {name: {"shape": list(a.shape), "dtype": str(a.dtype), "what": what} for name, (a, what) in arrays.items()}
    atomic_write_json(out / OUTPUTS_FILE, {"files": files, "plot": PLOT_FILE, "summary": SUMMARY_FILE,
                                           "side_file": side_file})
    atomic_write_json(out / SUMMARY_FILE, dict(summary))


def load_hierarchy(clusters: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, int, str]:
    """(fine centres [m, D], fine_to_coarse [m], number of coarse clusters, metric) of a two-level clustering."""
    clusters = os.fspath(clusters)
    files = {name: os.path.join(clusters, name) for name in (CENTERS_FILE, FINE_TO_COARSE_FILE, COARSE_CENTERS_FILE)}
    missing = [name for name, path in files.items() if not os.path.isfile(path)]
    if missing:
        raise FileNotFoundError(f"{clusters} has no {', '.join(missing)} (the output of python -m clus_jax.cluster "
                                f"--levels M,N)")
    summary = read_summary(clusters) or {}
    return (np.load(files[CENTERS_FILE]), np.load(files[FINE_TO_COARSE_FILE]), len(np.load(files[COARSE_CENTERS_FILE])),
            summary.get("metric", "euclidean"))
