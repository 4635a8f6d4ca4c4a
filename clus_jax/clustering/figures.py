"""The figures of a finished clustering for its summary: cluster sizes, inertia over the embedding shards,
agreement with known classes, and the PNG of the size distribution."""
from __future__ import annotations

import io
import os
from collections.abc import Iterable
from typing import Any

import numpy as np

from clus_jax.clustering import quality
from clus_jax.data.side_fields import SideFieldReader


def size_figures(assignments: np.ndarray, k: int) -> tuple[np.ndarray, dict[str, Any]]:
    """(points per cluster, the summary's size figures: min, max, mean, imbalance, empty fraction)."""
    stats = quality.cluster_sizes(assignments, k)
    sizes = stats.counts
    return sizes, {"min": int(sizes.min()), "max": int(sizes.max()), "mean": float(sizes.mean()),
                   "imbalance": stats.imbalance, "fraction_empty": stats.fraction_empty}


def streamed_inertia(shards: Iterable[np.ndarray], centers: np.ndarray, assignments: np.ndarray) -> float:
    """``quality.inertia`` (mean squared distance to the assigned centre) over the shards, one at a time."""
    total, row = 0.0, 0
    for chunk in shards:
        total += quality.inertia(chunk, centers, assignments[row:row + len(chunk)]) * len(chunk)
        row += len(chunk)
    return total / max(row, 1)


def read_labels(path: str | os.PathLike, records: np.ndarray) -> np.ndarray:
    """The class of every embedded row (``records``: each row's record index) from ``path`` (a ``.npy`` or side
    file, field ``labels``), read before the clustering so a bad file fails at once.

    Raises ValueError, starting with ``path``, when the file cannot be read or is too short."""
    path = os.fspath(path)
    try:
        reader = SideFieldReader(path, field="labels")
        labels = reader.array().reshape(len(reader), -1)[:, 0]
    except (FileNotFoundError, ValueError) as e:
        raise ValueError(f"{path}: {e}") from None
    if len(labels) <= records.max(initial=0):
        raise ValueError(f"{path} has {len(labels)} rows but the embeddings reach record {records.max()}")
    return labels[records]


def label_figures(truth: np.ndarray, assignments: np.ndarray) -> dict[str, float]:
    """NMI, adjusted Rand index and purity of ``assignments`` against ``truth`` (``read_labels``), row by row."""
    return {"nmi": quality.nmi(truth, assignments),
            "adjusted_rand_index": quality.adjusted_rand_index(truth, assignments),
            "purity": quality.purity(truth, assignments)}


def sizes_png(sizes: np.ndarray, title: str, coarse: np.ndarray | None = None) -> bytes:
    """PNG of the cluster-size distribution: sizes by rank (log scale, mean marked), their histogram, and the
    coarse clusters' sizes when given."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt
    from matplotlib.ticker import MaxNLocator

    panels = 3 if coarse is not None else 2
    fig, axes = plt.subplots(1, panels, figsize=(4.2 * panels, 3.4))
    ranked = np.sort(sizes)[::-1]
    axes[0].plot(np.arange(1, len(ranked) + 1), np.maximum(ranked, 0.5), drawstyle="steps-mid")
    axes[0].axhline(sizes.mean(), color="grey", linestyle="--", label=f"mean {sizes.mean():.3g}")
    axes[0].set(xlabel="cluster rank", ylabel="points", yscale="log", title="sizes by rank")
    axes[0].legend(fontsize=8)
    axes[1].hist(sizes, bins=min(50, max(len(np.unique(sizes)), 1)))
    axes[1].set(xlabel="points in a cluster", ylabel="clusters", title="size histogram")
    if coarse is not None:
        axes[2].bar(np.arange(len(coarse)), coarse)
        axes[2].set(xlabel="coarse cluster", ylabel="points", title="coarse sizes")
    for axis in (axes[0].xaxis, axes[1].yaxis, *((axes[2].xaxis,) if coarse is not None else ())):
        axis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()
