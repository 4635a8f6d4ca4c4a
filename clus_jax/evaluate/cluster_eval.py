"""Cluster quality of frozen image embeddings against class labels: k-means and the swap prototype banks.

Two clusterings of a labelled set's image embeddings are scored with NMI, adjusted Rand index and purity
(``clus_jax.clustering.quality``):

- ``kmeans``: spherical k-means (``clus_jax.clustering.kmeans``: cosine, k-means++ seeding, fixed seed, at
  most 30 Lloyd iterations) with k = the number of classes, on the embeddings of any model;
- ``bank_<i>``: the arg-max prototype of each embedding under the swap objective's bank ``i``
  (``params['swap']['bank_<i>']``, rows re-normalised here as the objective does every step), i.e. the
  clustering the run itself learned, with its own K.

Purity rewards many clusters (one point per cluster has purity 1) and NMI leans the same way, so bank
figures are comparable across runs with the same bank sizes; the k-means figures are comparable across any
runs. ARI is corrected for chance and is the fairest across different K.
"""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from clus_jax.clustering import quality

KMEANS_SEED = 0
KMEANS_ITERS = 30
KMEANS_TOL = 1e-5  # stop once the relative change in inertia is below this (converged)
SCORES = ("nmi", "ari", "purity")


def scores(labels, assignments) -> dict[str, float]:
    """``{'nmi', 'ari', 'purity'}`` of a clustering against the true labels (invariant to relabelling)."""
    return {"nmi": quality.nmi(labels, assignments),
            "ari": quality.adjusted_rand_index(labels, assignments),
            "purity": quality.purity(labels, assignments)}


def bank_assignments(embeddings, bank) -> np.ndarray:
    """Arg-max prototype of each embedding against the unit-length rows of ``bank`` [K, D] (ties: lower index)."""
    rows = np.asarray(bank, np.float32)
    rows = rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)
    return np.argmax(np.asarray(embeddings, np.float32) @ rows.T, axis=1).astype(np.int64)


def kmeans_assignments(embeddings, k: int, *, seed: int = KMEANS_SEED) -> np.ndarray:
    """Cluster of each embedding under spherical k-means with ``k`` centres (``clus_jax.clustering.kmeans``)."""
    from clus_jax import clustering

    result = clustering.kmeans(np.asarray(embeddings, np.float32), int(k), num_iters=KMEANS_ITERS,
                               tol=KMEANS_TOL, metric="cosine", init="kmeans++", seed=seed)
    return np.asarray(result.assignments, np.int64)


def metric_names(set_name: str, bank_names=()) -> list[str]:
    """The keys ``cluster_metrics`` returns for one set, in order."""
    return [f"cluster/{set_name}/{source}_{score}" for source in ("kmeans", *bank_names) for score in SCORES]


def cluster_metrics(set_name: str, embeddings, labels, num_classes: int,
                    banks: Mapping[str, np.ndarray] | None = None) -> dict[str, float]:
    """``cluster/<set>/kmeans_{nmi,ari,purity}`` and ``cluster/<set>/<bank>_{nmi,ari,purity}`` per bank."""
    labels = np.asarray(labels).astype(np.int64).reshape(-1)
    clusterings = {"kmeans": kmeans_assignments(embeddings, min(int(num_classes), len(labels)))}
    for name, bank in (banks or {}).items():
        clusterings[name] = bank_assignments(embeddings, bank)
    return {f"cluster/{set_name}/{source}_{score}": value
            for source, assignments in clusterings.items()
            for score, value in scores(labels, assignments).items()}

