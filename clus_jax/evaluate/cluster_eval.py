"""Cluster quality of frozen image embeddings against class labels: k-means and the objectives' cluster heads.

Two clusterings of a labelled set's image embeddings are scored with NMI, adjusted Rand index and purity
(``clus_jax.clustering.quality``):

- ``kmeans``: spherical k-means (``clus_jax.clustering.kmeans``: cosine, k-means++ seeding, fixed seed, at
  most 30 Lloyd iterations) with k = the number of classes, on the embeddings of any model;
- ``<head>``: the arg-max row of each embedding under a cluster head [K, D] that an objective names
  (``Objective.eval_heads``; rows re-normalised here), i.e. a clustering the run itself learned, with its
  own K.

Purity rewards many clusters (one point per cluster has purity 1) and NMI leans the same way, so head
figures are comparable across runs with the same head sizes; the k-means figures are comparable across any
runs. ARI is corrected for chance and is the fairest across different K.

A non-finite embedding (NaN or inf) is refused, naming the set; with ``nonfinite='wrong'`` the finite ones are
clustered and the others put together in one extra cluster that knows nothing of the labels: with every
embedding non-finite, NMI and ARI are 0 and purity the largest class's share, as for a model collapsed to a
point.
"""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from clus_jax.clustering import quality
from clus_jax.evaluate import metrics

KMEANS_SEED = 0
KMEANS_ITERS = 30
KMEANS_TOL = 1e-5  # stop once the relative change in inertia is below this (converged)
SCORES = ("nmi", "ari", "purity")


def scores(labels, assignments) -> dict[str, float]:
    """``{'nmi', 'ari', 'purity'}`` of a clustering against the true labels (invariant to relabelling)."""
    return {"nmi": quality.nmi(labels, assignments),
            "ari": quality.adjusted_rand_index(labels, assignments),
            "purity": quality.purity(labels, assignments)}


def head_assignments(embeddings, head) -> np.ndarray:
    """Arg-max row of each embedding against the unit-length rows of ``head`` [K, D] (ties: lower index)."""
    rows = np.asarray(head, np.float32)
    rows = rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)
    return np.argmax(np.asarray(embeddings, np.float32) @ rows.T, axis=1).astype(np.int64)


def kmeans_assignments(embeddings, k: int, *, seed: int = KMEANS_SEED) -> np.ndarray:
    """Cluster of each embedding under spherical k-means with ``k`` centres (``clus_jax.clustering.kmeans``)."""
    from clus_jax import clustering

    result = clustering.kmeans(np.asarray(embeddings, np.float32), int(k), num_iters=KMEANS_ITERS,
                               tol=KMEANS_TOL, metric="cosine", init="kmeans++", seed=seed)
    return np.asarray(result.assignments, np.int64)


def metric_names(set_name: str, head_names=()) -> list[str]:
    """The keys ``cluster_metrics`` returns for one set, in order."""
    return [f"cluster/{set_name}/{source}_{score}" for source in ("kmeans", *head_names) for score in SCORES]


def _finite_only(assign, embeddings: np.ndarray, ok: np.ndarray) -> np.ndarray:
    """``assign(embeddings)`` of the finite rows; -1, one extra cluster, for the others."""
    if ok.all():
        return assign(embeddings)
    out = np.full(len(ok), -1, np.int64)
    if ok.any():
        out[ok] = assign(embeddings[ok])
    return out


def cluster_metrics(set_name: str, embeddings, labels, num_classes: int,
                    heads: Mapping[str, np.ndarray] | None = None, *, nonfinite: str = "raise") -> dict[str, float]:
    """``cluster/<set>/kmeans_{nmi,ari,purity}`` and ``cluster/<set>/<head>_{nmi,ari,purity}`` per head.

    ``labels`` must lie in ``[0, num_classes)``; ``nonfinite``: see the module docstring."""
    embeddings = np.asarray(embeddings)
    labels = metrics.check_labels(labels, int(num_classes), f"set {set_name!r}: labels")
    if len(labels) != len(embeddings) or not len(labels):
        raise ValueError(f"set {set_name!r}: {len(embeddings)} embeddings and {len(labels)} labels; "
                         "cluster quality needs one label per embedding and at least one")
    ok = metrics.check_finite(embeddings, "image embeddings", nonfinite, where=f"set {set_name!r}: ")
    clusterings = {"kmeans": _finite_only(lambda e: kmeans_assignments(e, min(int(num_classes), len(e))),
                                          embeddings, ok)}
    for name, head in (heads or {}).items():
        clusterings[name] = _finite_only(lambda e, head=head: head_assignments(e, head), embeddings, ok)
    return {f"cluster/{set_name}/{source}_{score}": value
            for source, assignments in clusterings.items()
            for score, value in scores(labels, assignments).items()}

