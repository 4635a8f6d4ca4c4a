"""Quality figures of a clustering, on NumPy arrays: agreement with labels (NMI, adjusted Rand index,
purity), inertia (mean squared distance to the assigned centre) and the cluster-size distribution.

NMI uses the arithmetic-mean normalisation, sklearn's default (``normalized_mutual_info_score``), and the
adjusted Rand index is Hubert and Arabie's, so figures compare with the usual tables. Degenerate inputs follow
scikit-learn too: two identical partitions score 1 under all three, the empty one and a single point
included (no pair of points disagrees); nothing is NaN."""
from __future__ import annotations

import dataclasses

import numpy as np


def _contingency(labels_true: np.ndarray, labels_pred: np.ndarray) -> np.ndarray:
    """[classes, clusters] counts of (true, predicted) pairs; labels may be any integers or strings."""
    labels_true = np.asarray(labels_true).reshape(-1)
    labels_pred = np.asarray(labels_pred).reshape(-1)
    if labels_true.shape != labels_pred.shape:
        raise ValueError(f"labels_true has {labels_true.size} entries but labels_pred has {labels_pred.size}")
    _, true_ids = np.unique(labels_true, return_inverse=True)
    _, pred_ids = np.unique(labels_pred, return_inverse=True)
    table = np.zeros((true_ids.max(initial=-1) + 1, pred_ids.max(initial=-1) + 1), np.int64)
    np.add.at(table, (true_ids, pred_ids), 1)
    return table


def _entropy(counts: np.ndarray) -> float:
    counts = counts[counts > 0].astype(np.float64)
    p = counts / counts.sum()
    return float(-(p * np.log(p)).sum())


def nmi(labels_true: np.ndarray, labels_pred: np.ndarray) -> float:
    """Normalised mutual information, I(T; P) / ((H(T) + H(P)) / 2); 1.0 when both are one cluster or there
    are no points (scikit-learn's ``normalized_mutual_info_score``)."""
    table = _contingency(labels_true, labels_pred)
    n = table.sum()
    if n == 0:
        return 1.0
    h_true, h_pred = _entropy(table.sum(1)), _entropy(table.sum(0))
    if h_true == 0.0 and h_pred == 0.0:  # both trivial: identical partitions (sklearn's convention)
        return 1.0
    rows, cols = np.nonzero(table)
    joint = table[rows, cols] / n
    outer = table.sum(1)[rows] * table.sum(0)[cols] / float(n) ** 2
    mutual = float((joint * np.log(joint / outer)).sum())
    return max(mutual, 0.0) / ((h_true + h_pred) / 2.0)


def _pairs(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    return x * (x - 1.0) / 2.0


def adjusted_rand_index(labels_true: np.ndarray, labels_pred: np.ndarray) -> float:
    """Adjusted Rand index (Hubert and Arabie 1985): 1 for identical partitions, 0 in expectation by chance.

    Fewer than two points have no pair to disagree on: 1.0, as scikit-learn's ``adjusted_rand_score``."""
    table = _contingency(labels_true, labels_pred)
    n = table.sum()
    if n < 2:
        return 1.0
    sum_cells = _pairs(table).sum()
    sum_rows, sum_cols = _pairs(table.sum(1)).sum(), _pairs(table.sum(0)).sum()
    expected = sum_rows * sum_cols / _pairs(np.array(n))
    maximum = (sum_rows + sum_cols) / 2.0
    if maximum == expected:  # both partitions trivial and identical (one cluster each, or all singletons)
        return 1.0
    return float((sum_cells - expected) / (maximum - expected))


def purity(labels_true: np.ndarray, labels_pred: np.ndarray) -> float:
    """Fraction of points whose cluster's majority class is their own class; 1.0 for no points (nothing to
    disagree on, as NMI and ARI)."""
    table = _contingency(labels_true, labels_pred)
    n = table.sum()
    return float(table.max(0).sum() / n) if n else 1.0


def inertia(points: np.ndarray, centers: np.ndarray, assignments: np.ndarray) -> float:
    """Mean squared euclidean distance from each point to its assigned centre (float64 accumulation)."""
    points = np.asarray(points, np.float64)
    centers = np.asarray(centers, np.float64)
    diff = points - centers[np.asarray(assignments)]
    return float((diff * diff).sum(1).mean()) if len(points) else 0.0


@dataclasses.dataclass(frozen=True)
class ClusterSizes:
    """Size of every cluster, with the figures that show collapse: imbalance (max/mean size) and the
    fraction of clusters that are empty."""
    counts: np.ndarray  # [k] int64
    imbalance: float
    fraction_empty: float


def cluster_sizes(assignments: np.ndarray, k: int) -> ClusterSizes:
    """Histogram of ``assignments`` (ids in [0, k)) with imbalance = max/mean and the empty fraction."""
    assignments = np.asarray(assignments).reshape(-1)
    if assignments.size and (assignments.min() < 0 or assignments.max() >= k):
        raise ValueError(f"assignments must lie in [0, {k}), got [{assignments.min()}, {assignments.max()}]")
    counts = np.bincount(assignments, minlength=k).astype(np.int64)
    mean = counts.mean() if k else 0.0
    imbalance = float(counts.max() / mean) if mean > 0 else 0.0
    return ClusterSizes(counts=counts, imbalance=imbalance, fraction_empty=float((counts == 0).mean()) if k else 0.0)
