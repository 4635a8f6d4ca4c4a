"""Balanced assignment (every centre gets exactly N / M points at minimal total cost) and balanced k-means.

``balanced_assign`` solves the transportation problem with equal capacities by an auction (Bertsekas'
forward auction on the problem where each centre is expanded into N / M identical slots, run
Jacobi-style: every unassigned point bids at once for the cheapest slot of its best centre, and a centre
keeps the N / M highest of its current prices and new bids), with ε-scaling. With ε the final step, the
total cost is within N ε of the optimum; ε is set below the cost resolution (``rel_eps`` of the cost range
/ N), so the result is optimal up to float rounding. The slots of one centre are identical, so only the
two cheapest slot prices per centre are needed to bid; memory is O(N M) for the cost alone.

``balanced_kmeans`` alternates that assignment with the centre update, as kernelmachine/balanced-kmeans
(the package MoDE uses) does; the clusters are exactly equal at every iteration, including the returned
one.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np

from clus_jax.clustering.result import KMeansResult

#: Final ε relative to (cost range / N): the total cost is within this fraction of the range of the optimum.
DEFAULT_REL_EPS = 1e-7
EPS_FACTOR = 4.0  # ε-scaling: each phase divides ε by this


def balanced_assign(cost: np.ndarray, *, rel_eps: float = DEFAULT_REL_EPS) -> np.ndarray:
    """ids [N] int32 with every column of ``cost`` [N, M] chosen exactly N / M times, minimising the sum
    of the chosen costs (within ``rel_eps`` x the cost range). N must be divisible by M."""
    cost = np.asarray(cost, np.float64)
    if cost.ndim != 2:
        raise ValueError(f"cost must be [N, M], got shape {cost.shape}")
    n, m = cost.shape
    if m == 0 or n % m:
        raise ValueError(f"balanced_assign needs N divisible by M; got N={n}, M={m}")
    if not np.all(np.isfinite(cost)):
        raise ValueError("cost has non-finite entries")
    cap = n // m
    if n == 0:
        return np.zeros(0, np.int32)
    benefit = cost.min() - cost  # maximise benefit <=> minimise cost; benefit <= 0
    spread = float(-benefit.min())
    if spread == 0.0:
        return np.repeat(np.arange(m, dtype=np.int32), cap)
    eps_final = rel_eps * spread / n
    eps = spread / EPS_FACTOR
    prices = np.zeros((m, cap))
    while True:
        owner = _auction_phase(benefit, prices, eps)
        if eps <= eps_final:
            break
        eps = max(eps / EPS_FACTOR, eps_final)
    ids = np.empty(n, np.int32)
    ids[owner.reshape(-1)] = np.repeat(np.arange(m, dtype=np.int32), cap)
    return ids


def _auction_phase(benefit: np.ndarray, prices: np.ndarray, eps: float) -> np.ndarray:
    """One ε phase from the given slot prices (each row sorted in descending order, updated in place);
    returns owner [M, cap] (point ids, aligned with ``prices``)."""
    n, m = benefit.shape
    cap = prices.shape[1]
    owner = np.full((m, cap), -1, np.int64)
    centre_of = np.full(n, -1, np.int64)
    rows = np.arange(n)
    while True:
        free = rows[centre_of < 0]
        if free.size == 0:
            return owner
        cheapest = prices[:, -1]
        second = prices[:, -2] if cap >= 2 else np.full(m, np.inf)
        values = benefit[free] - cheapest[None, :]
        best = np.argmax(values, axis=1)
        picked = np.arange(free.size)
        best_value = values[picked, best]
        values[picked, best] = -np.inf
        # The runner-up: the best other centre, or the second-cheapest slot of the same one.
        runner_up = np.maximum(values.max(axis=1) if m > 1 else -np.inf, benefit[free, best] - second[best])
        runner_up = np.where(np.isfinite(runner_up), runner_up, best_value)  # one slot in all: smallest raise
        bids = cheapest[best] + best_value - runner_up + eps
        # Each centre that is bid for keeps the cap highest of its prices and its new bids.
        order = np.lexsort((-bids, best))
        best_sorted, bids_sorted, who = best[order], bids[order], free[order]
        rank = np.arange(order.size) - np.searchsorted(best_sorted, best_sorted, side="left")
        keep = rank < cap
        bid_for, slot_of = np.unique(best_sorted, return_inverse=True)
        new_prices = np.full((bid_for.size, cap), -np.inf)
        new_owner = np.full((bid_for.size, cap), -1, np.int64)
        new_prices[slot_of[keep], rank[keep]] = bids_sorted[keep]
        new_owner[slot_of[keep], rank[keep]] = who[keep]
        merged_prices = np.concatenate([prices[bid_for], new_prices], axis=1)
        merged_owner = np.concatenate([owner[bid_for], new_owner], axis=1)
        top = np.argsort(-merged_prices, axis=1, kind="stable")[:, :cap]
        displaced = owner[bid_for].reshape(-1)
        centre_of[displaced[displaced >= 0]] = -1
        prices[bid_for] = np.take_along_axis(merged_prices, top, axis=1)
        owner[bid_for] = np.take_along_axis(merged_owner, top, axis=1)
        held = owner[bid_for] >= 0
        centre_of[owner[bid_for][held]] = bid_for[np.nonzero(held)[0]]


def squared_distances(points: np.ndarray, centers: np.ndarray) -> np.ndarray:
    """[N, K] float64 squared euclidean distances (the cost of a balanced assignment)."""
    x = np.asarray(points, np.float64)
    c = np.asarray(centers, np.float64)
    return np.maximum((x * x).sum(1)[:, None] - 2.0 * x @ c.T + (c * c).sum(1)[None, :], 0.0)


def _unit(c: np.ndarray) -> np.ndarray:
    return c / np.maximum(np.linalg.norm(c, axis=1, keepdims=True), 1e-12)


def balanced_kmeans(points: np.ndarray, k: int, *, num_iters: int, metric: str, init: np.ndarray,
                    tol: float | None = None, progress: Callable[[int, float, float], None] | None = None,
                    checkpoints=None):
    """k-means whose every assignment (each iteration's and the returned one) gives each centre exactly N / k
    points (``balanced_assign`` on the squared distances). ``checkpoints`` (a ``state.CenterCheckpoints``)
    saves the centres after every iteration and resumes from the newest save. Returns a
    ``result.KMeansResult``."""

    x = np.asarray(points, np.float32)
    if x.shape[0] % k:
        raise ValueError(f"balanced k-means needs N divisible by k; got N={x.shape[0]}, k={k}")
    centers = np.asarray(init, np.float32)
    if metric == "cosine":
        centers = _unit(centers)
    previous, iters, done = np.nan, 0, False
    restored = checkpoints.restore() if checkpoints is not None else None
    if restored is not None:
        centers, iters, previous, done = restored
    for iteration in range(iters, 0 if done else num_iters):
        cost = squared_distances(x, centers)
        ids = balanced_assign(cost)
        current = float(cost[np.arange(len(x)), ids].mean())
        if progress is not None:
            progress(iteration, 1.0, current)
        sums = np.zeros((k, x.shape[1]), np.float64)
        np.add.at(sums, ids, x)
        centers = (sums / np.bincount(ids, minlength=k)[:, None]).astype(np.float32)
        if metric == "cosine":
            centers = _unit(centers)
        iters = iteration + 1
        done = tol is not None and np.isfinite(previous) and previous - current <= tol * max(previous, 1e-30)
        previous = current
        if checkpoints is not None:
            checkpoints.save(centers, iters, previous, done)
        if done:
            break
    cost = squared_distances(x, centers)
    ids = balanced_assign(cost)
    return KMeansResult(centers=centers, assignments=ids, inertia=float(cost[np.arange(len(x)), ids].mean()),
                        sizes=np.bincount(ids, minlength=k).astype(np.int64), num_iters_run=iters)
