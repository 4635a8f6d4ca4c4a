"""MoDE's assignment and ensemble rules: which expert a caption trains, and how experts are mixed per task.

MoDE (Ma et al., CVPR 2024; reference code facebookresearch/MetaCLIP ``apps/mode``) clusters caption
embeddings into m fine centres and the fine centres into n coarse ones, trains one CLIP expert per coarse
cluster, and ensembles the experts with weights computed from the task's metadata. This module holds the
pure rules, on NumPy arrays:

- ``nearest_centers``: nearest centre and its distance, euclidean (not squared, ``torch.cdist``) or cosine
  (``1 - cos``, both sides normalised, as balanced-kmeans' ``pairwise_cosine``); ties go to the lower index.
- ``fine_assignment``: each record's fine centre from its L2-normalised feature (``prep_inference``'s
  nearest fine centre); ``coarse_assignment``: each fine centre's nearest coarse centre (``KMeans.predict``
  as ``prep_hrchy.py`` uses it). Both are greedy, as the balanced k-means authors describe inference
  (balancing only while estimating centres); one published revision of balanced-kmeans' ``predict``
  solves a balanced assignment (``auction_lap``) instead, which is not what is done here.
- ``expert_membership``: expert c's records, those whose fine centre maps to c, plus a seeded random
  ``ooc_ratio`` of the others (``mode_wds.IterativeMoDEWebDataset.dataset_filter``; 0.02 by default there).
  The reference draws the out-of-cluster records per tar shard from NumPy's global state; here each expert
  draws over all records from its own ``(seed, c)`` generator, so the sets are reproducible.
- ``mode_ensemble_weights``: ``post_report_ensemble.main``'s rule. Per class embedding its nearest fine
  centre and distance d; expert k's score ``w_k = sum over the classes routed to k of exp((a - d) * b)``
  (0 when none), ``b = 5 * log10(max(10, n_class - 200))``, ``a = exp(0.5 - sqrt(n_class))`` when
  ``n_class < 10`` else 0; weights ``softmax(w / 8)``. An expert no class reaches keeps ``exp(0)`` in the
  softmax, as in the reference.
- ``retrieval_weights``: MoDE's per-query variant for retrieval by text queries: each query is its own
  one-class task (``p(c | T_q)``), so every query gets its own weights.
- ``ensemble_logits``: ``sum_k weight_k * logits_k`` of the experts' raw cosine logits, with task weights
  [E] or per-query weights [N, E].

Nearest centres are found by ``clustering.assign`` (chunked, optionally sharded over a mesh); the distances
the weights use are recomputed in float64.
"""
from __future__ import annotations

import numpy as np
from jax.sharding import Mesh

from clus_jax.clustering.assign import assign

METRICS = ("euclidean", "cosine")
DEFAULT_OOC_RATIO = 0.02
# post_report_ensemble's constants: smooth_weight = [5.0, 8.0], too_many_class = 200
SHARPNESS = 5.0
TEMPERATURE = 8.0
TOO_MANY_CLASSES = 200


def _check_metric(metric: str) -> None:
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (a zero row stays zero), in the input's float precision."""
    x = np.asarray(x)
    x = x if x.dtype == np.float64 else x.astype(np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def nearest_centers(x: np.ndarray, centers: np.ndarray, metric: str = "euclidean", *,
                    mesh: Mesh | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(ids [N] int32, distances [N] float64) of each row's nearest centre, as given (no normalising).

    The search is ``clustering.assign`` (float32, chunked, sharded over ``mesh``, no [N, K] array); the
    distance to the chosen centre is then recomputed directly in float64, free of the cancellation in
    ``|x|^2 - 2 x.c + |c|^2``.
    """
    _check_metric(metric)
    x, centers = np.asarray(x, np.float32), np.asarray(centers, np.float32)
    if x.ndim != 2 or centers.ndim != 2 or x.shape[1] != centers.shape[1] or len(centers) == 0:
        raise ValueError(f"x [N, D] and centers [K >= 1, D] must share D; got {x.shape} and {centers.shape}")
    ids = assign(x, centers, metric, mesh=mesh).astype(np.int32)
    a, c = x.astype(np.float64), centers[ids].astype(np.float64)
    if metric == "cosine":
        dist = 1.0 - (l2_normalize(a) * l2_normalize(c)).sum(-1)
    else:
        dist = np.linalg.norm(a - c, axis=-1)
    return ids, dist


def fine_assignment(features: np.ndarray, fine_centers: np.ndarray, metric: str = "euclidean", *,
                    mesh: Mesh | None = None) -> np.ndarray:
    """Each record's fine centre [N] int32: nearest centre to its L2-normalised feature (MoDE's default)."""
    return nearest_centers(l2_normalize(features), fine_centers, metric, mesh=mesh)[0]


def coarse_assignment(fine_centers: np.ndarray, coarse_centers: np.ndarray, metric: str = "euclidean") -> np.ndarray:
    """Each fine centre's coarse centre (its expert) [m] int32: the nearest coarse centre."""
    return nearest_centers(fine_centers, coarse_centers, metric)[0]


def _check_fine_to_coarse(fine_to_coarse: np.ndarray, num_experts: int) -> np.ndarray:
    fine_to_coarse = np.asarray(fine_to_coarse)
    if num_experts < 1:
        raise ValueError(f"num_experts must be >= 1, got {num_experts}")
    if fine_to_coarse.ndim != 1 or fine_to_coarse.size == 0:
        raise ValueError(f"fine_to_coarse must be a non-empty [m] array, got shape {fine_to_coarse.shape}")
    if fine_to_coarse.min() < 0 or fine_to_coarse.max() >= num_experts:
        raise ValueError(f"fine_to_coarse values must lie in [0, {num_experts}), "
                         f"got [{fine_to_coarse.min()}, {fine_to_coarse.max()}]")
    return fine_to_coarse.astype(np.int64)


def expert_membership(fine_ids: np.ndarray, fine_to_coarse: np.ndarray, num_experts: int,
                      ooc_ratio: float = DEFAULT_OOC_RATIO, seed: int = 0) -> list[np.ndarray]:
    """Per expert, the sorted record indices (int64) it trains on.

    Expert c keeps every record whose fine centre maps to c and ``int(ooc_ratio * #others)`` of the others
    drawn without replacement. Each expert draws from its own generator seeded by ``(seed, c)``, so the
    subsets do not depend on how many experts are built at once (an expert added later gets the same set).
    """
    fine_to_coarse = _check_fine_to_coarse(fine_to_coarse, num_experts)
    fine_ids = np.asarray(fine_ids, np.int64)
    if fine_ids.size and (fine_ids.min() < 0 or fine_ids.max() >= len(fine_to_coarse)):
        raise ValueError(f"fine_ids must lie in [0, {len(fine_to_coarse)}), got [{fine_ids.min()}, {fine_ids.max()}]")
    if not 0.0 <= ooc_ratio <= 1.0:
        raise ValueError(f"ooc_ratio must lie in [0, 1], got {ooc_ratio}")
    expert_of_record = fine_to_coarse[fine_ids]
    members = []
    for c in range(num_experts):
        inside = expert_of_record == c
        kept, others = np.flatnonzero(inside), np.flatnonzero(~inside)
        num_ooc = int(len(others) * ooc_ratio)
        if num_ooc:
            rng = np.random.default_rng((seed, c))
            kept = np.concatenate([kept, rng.choice(others, size=num_ooc, replace=False)])
        members.append(np.sort(kept))
    return members


def _expert_scores(dist: np.ndarray, experts: np.ndarray, num_experts: int, n_class: int,
                   sharpness: float, too_many_classes: int) -> np.ndarray:
    """[R, L] distances and experts of R tasks of L classes each -> [R, E] scores w (float64)."""
    a = np.exp(0.5 - np.sqrt(n_class)) if n_class < 10 else 0.0
    b = sharpness * np.log10(max(10, n_class - too_many_classes))
    terms = np.exp((a - dist.astype(np.float64)) * b)  # [R, L]
    onehot = experts[..., None] == np.arange(num_experts)  # [R, L, E]
    return (terms[..., None] * onehot).sum(axis=1)


def _softmax(w: np.ndarray) -> np.ndarray:
    e = np.exp(w - w.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def mode_ensemble_weights(task_embeddings: np.ndarray, fine_centers: np.ndarray, fine_to_coarse: np.ndarray,
                          num_experts: int, *, sharpness: float = SHARPNESS, temperature: float = TEMPERATURE,
                          too_many_classes: int = TOO_MANY_CLASSES) -> np.ndarray:
    """Expert weights [num_experts] (float64, sum 1) for a task from its class embeddings [n_class, D].

    ``task_embeddings`` are the class names' caption-encoder embeddings (MoDE: templates averaged), used
    as given; distances are euclidean to the fine centres, as in ``post_report_ensemble``.
    """
    fine_to_coarse = _check_fine_to_coarse(fine_to_coarse, num_experts)
    task_embeddings = np.asarray(task_embeddings, np.float32)
    if task_embeddings.ndim != 2 or len(task_embeddings) == 0:
        raise ValueError(f"task_embeddings must be [n_class >= 1, D], got shape {task_embeddings.shape}")
    fine, dist = nearest_centers(task_embeddings, fine_centers, "euclidean")
    w = _expert_scores(dist[None], fine_to_coarse[fine][None], num_experts, len(task_embeddings),
                       sharpness, too_many_classes)
    return _softmax(w / temperature)[0]


def retrieval_weights(query_embeddings: np.ndarray, fine_centers: np.ndarray, fine_to_coarse: np.ndarray,
                      num_experts: int, *, sharpness: float = SHARPNESS, temperature: float = TEMPERATURE,
                      too_many_classes: int = TOO_MANY_CLASSES) -> np.ndarray:
    """Per-query expert weights [Q, num_experts]: row q is ``mode_ensemble_weights`` of query q alone.

    MoDE's retrieval routing ``p(c | T_q)``: each text query is a task of one class, so its weights come
    from its own nearest fine centre (n_class = 1: ``a = exp(-0.5)``, ``b = 5``). For retrieval whose
    queries are images, weigh the experts by the caption corpus instead: ``mode_ensemble_weights`` of all
    candidate captions.
    """
    fine_to_coarse = _check_fine_to_coarse(fine_to_coarse, num_experts)
    fine, dist = nearest_centers(np.asarray(query_embeddings, np.float32), fine_centers, "euclidean")
    w = _expert_scores(dist[:, None], fine_to_coarse[fine][:, None], num_experts, 1, sharpness, too_many_classes)
    return _softmax(w / temperature)


def ensemble_logits(expert_logits: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """[N, C] = sum_k weights_k * expert_logits[k] for expert logits [E, N, C] and weights [E] or [N, E]."""
    expert_logits, weights = np.asarray(expert_logits), np.asarray(weights)
    if expert_logits.ndim != 3:
        raise ValueError(f"expert_logits must be [E, N, C], got shape {expert_logits.shape}")
    num_experts, n = expert_logits.shape[:2]
    if weights.shape == (num_experts,):
        return np.einsum("k,knc->nc", weights, expert_logits)
    if weights.shape == (n, num_experts):
        return np.einsum("nk,knc->nc", weights, expert_logits)
    raise ValueError(f"weights must be [{num_experts}] or [{n}, {num_experts}] for expert_logits "
                     f"{expert_logits.shape}, got shape {weights.shape}")
