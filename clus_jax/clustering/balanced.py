"""Balanced assignment (every centre gets exactly N / M points at minimal total cost) and balanced k-means.

The assignment is the transportation problem with equal capacities, solved by an auction (Bertsekas' forward
auction on the problem where each centre is expanded into N / M identical slots) with ε-scaling: a free point
bids for the cheapest slot of its best centre (best by benefit minus price), raising that slot's price by
its margin over the runner-up plus ε and displacing the slot's holder. With ε the final step, the total
cost is within N ε of the optimum; ε ends at the cost resolution, so the result is optimal up to float rounding:
``rel_eps`` of the cost range / N for a dense float64 cost, ``rel_eps`` of the range for points, whose distances
are float32. The slots of one centre are identical, so each centre keeps
its slot prices in a min-heap: a bid needs only the cheapest and the second cheapest. Bids are made one at
a time (Gauss-Seidel) in compiled code (numba): the late rounds of an auction free one point at a time, and
a chain of such bids costs microseconds there against a millisecond per vectorised round in NumPy.

A bid needs the point's best and second-best centre. Each point keeps a list of ``candidates`` centres with
their benefits:

- ``balanced_assign(cost)``: every centre of a dense [N, M] cost on the host (small problems, the reference);
- ``balanced_assign_points(points, centers, mesh=...)``: points and centres, with no [N, M] array. The lists
  are the best centres by (minus squared distance) - price, found on the device mesh by the blocked top-l
  search k-means uses (``assign.assign_topk``: points over the data axes, centres over the others). Prices
  only rise, so a centre outside a point's list is never better than the list's last entry was when the
  list was made; while the point's second-best listed value is at least that, its best two are exact. A
  point whose list no longer proves that waits, and the waiting points are searched again together, on
  the mesh at the current prices (a few on the host). The full search runs once per assignment.

``balanced_kmeans`` alternates that assignment with the centre update, as kernelmachine/balanced-kmeans
(the package MoDE uses) does; the clusters are exactly equal at every iteration, including the returned
one.
"""
from __future__ import annotations

from collections.abc import Callable

import numba
import numpy as np
from jax.sharding import Mesh

from clus_jax.clustering.assign import assign_topk
from clus_jax.clustering.blocked import DEFAULT_BLOCK_K, DEFAULT_CHUNK_ROWS
from clus_jax.clustering.result import KMeansResult

#: Final ε relative to (cost range / N): the total cost is within this fraction of the range of the optimum.
DEFAULT_REL_EPS = 1e-7
EPS_FACTOR = 4.0  # ε-scaling: each phase divides ε by this


#: Centres listed per point by ``balanced_assign_points`` (more: fewer searches again, more host work per round).
DEFAULT_CANDIDATES = 48
#: Up to this many waiting points are searched again on the host, one by one in the compiled bidding loop ([M]
#: values in float64), more together on the mesh: late rounds free a handful of points, not worth a round trip.
HOST_SEARCH_ROWS = 256


def _check_sizes(n: int, m: int, what: str) -> None:
    if m == 0 or n % m:
        raise ValueError(f"{what} needs N divisible by M; got N={n}, M={m}")


def balanced_assign(cost: np.ndarray, *, rel_eps: float = DEFAULT_REL_EPS) -> np.ndarray:
    """ids [N] int32 with every column of ``cost`` [N, M] chosen exactly N / M times, minimising the sum
    of the chosen costs (within ``rel_eps`` x the cost range). N must be divisible by M."""
    cost = np.asarray(cost, np.float64)
    if cost.ndim != 2:
        raise ValueError(f"cost must be [N, M], got shape {cost.shape}")
    n, m = cost.shape
    _check_sizes(n, m, "balanced_assign")
    if not np.all(np.isfinite(cost)):
        raise ValueError("cost has non-finite entries")
    if n == 0:
        return np.zeros(0, np.int32)
    benefit = cost.min() - cost  # maximise benefit <=> minimise cost; benefit <= 0
    return _auction(_DenseLists(benefit), n, m, float(-benefit.min()), rel_eps)


def balanced_assign_points(points: np.ndarray, centers: np.ndarray, *, metric: str = "euclidean",
                           mesh: Mesh | None = None, candidates: int = DEFAULT_CANDIDATES,
                           rel_eps: float = DEFAULT_REL_EPS, block_k: int = DEFAULT_BLOCK_K,
                           chunk_rows: int = DEFAULT_CHUNK_ROWS, host_search_rows: int = HOST_SEARCH_ROWS,
                           stats: dict | None = None) -> np.ndarray:
    """ids [N] int32 giving each of the M ``centers`` exactly N / M of ``points`` [N, D] at minimal total squared
    distance (``"cosine"``: to the unit centres), within ``rel_eps`` as ``balanced_assign``, with no [N, M] array:
    the distances are searched on ``mesh`` (see the module docstring), up to ``host_search_rows`` waiting points
    on the host. ``stats``, when given, receives the points searched again on the host and on the mesh and the
    number of mesh searches."""
    x = np.asarray(points, np.float32)
    c = np.asarray(centers, np.float32)
    if x.ndim != 2 or c.ndim != 2 or x.shape[1] != c.shape[1]:
        raise ValueError(f"points [N, D] and centers [M, D] must share D; got {x.shape} and {c.shape}")
    n, m = x.shape[0], c.shape[0]
    _check_sizes(n, m, "balanced_assign_points")
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(c))):
        raise ValueError("points or centers have non-finite entries")
    if n == 0:
        return np.zeros(0, np.int32)
    if metric == "cosine":
        c = _unit(c)
    bids = _MeshLists(x, c, min(max(candidates, 2), m), mesh, block_k, chunk_rows, host_search_rows)
    # Benefits are minus squared distances: their range is at most (|x| + max |c|)^2 over the points. The costs
    # are float32 (the device's), so ε stops at their resolution of that range: the total is then within N ε,
    # as close to the optimum as the costs' own rounding. ε starts at the points' mean listed range (first
    # listed minus last): a larger start makes prices outrun every list, and each phase search all points again.
    spread = float(np.max(np.linalg.norm(x, axis=1)) + np.max(np.linalg.norm(c, axis=1))) ** 2
    listed = float(np.mean(bids.benefit[:, 0] - bids.benefit[:, -1])) if m > 1 else 0.0
    ids = _auction(bids, n, m, spread, rel_eps, eps_final=rel_eps * spread, eps_start=max(listed, spread / n))
    if stats is not None:
        stats.update(searched_here=int(bids.searched_again[0]), searched_on_mesh=int(bids.searched_again[1]),
                     mesh_searches=bids.searches)
    return ids


class _DenseLists:
    """Every centre listed for every point (a dense benefit): the lists are always complete."""

    def __init__(self, benefit: np.ndarray):
        n, m = benefit.shape
        self.ids = np.ascontiguousarray(np.broadcast_to(np.arange(m, dtype=np.int32), (n, m)))
        self.benefit = np.ascontiguousarray(benefit, np.float64)
        self.bound = np.full(n, -np.inf)
        self.x, self.centers64, self.c_sq = np.zeros((0, 1), np.float32), np.zeros((m, 1)), np.zeros(m)
        self.search_here_max = 0
        self.searched_again = np.zeros(2, np.int64)
        self.fresh = np.zeros(n, np.bool_)

    def search_again(self, rows: np.ndarray, prices: np.ndarray) -> None:
        raise AssertionError("complete lists never wait")


class _MeshLists:
    """Each point's ``width`` best centres by benefit - price (benefit = minus squared distance), and the bound a
    centre not listed cannot beat; searched on the mesh (``assign_topk`` with the prices as offsets)."""

    def __init__(self, x, centers, width, mesh, block_k, chunk_rows, search_here_max):
        self.x, self.centers, self.width, self.complete = x, centers, width, width == centers.shape[0]
        self.search_kw = dict(mesh=mesh, block_k=block_k, chunk_rows=chunk_rows)
        n = x.shape[0]
        self.ids = np.empty((n, width), np.int32)
        self.benefit = np.empty((n, width), np.float64)
        self.bound = np.empty(n, np.float64)
        self.centers64 = np.ascontiguousarray(centers, np.float64)
        self.c_sq = np.sum(np.square(self.centers64), axis=1)
        self.search_here_max = search_here_max
        self.searched_again = np.zeros(2, np.int64)  # [on the host, on the mesh]
        self.searches = 0
        self.fresh = np.zeros(n, np.bool_)  # listed at the current prices (bids once without the bound's proof)
        self._search(None, np.zeros(centers.shape[0]))

    def search_again(self, rows: np.ndarray, prices: np.ndarray) -> None:
        self.searched_again[1] += rows.size
        self._search(rows, prices)
        self.fresh[rows] = True

    def _search(self, rows: np.ndarray, prices: np.ndarray) -> None:
        """Lists the ``width`` best centres by benefit - price of ``rows`` (None: every point), on the mesh."""
        self.searches += 1
        if rows is None:  # every point, in order (the first search): no copy of the points
            xs, count, rows = self.x, self.x.shape[0], slice(None)
        else:  # padded to a power of two so the searches again compile once per size class
            count = rows.size
            xs = np.zeros((max(64, 1 << (count - 1).bit_length()), self.x.shape[1]), np.float32)
            xs[:count] = self.x[rows]
        p32 = prices.astype(np.float32)
        ids, values = assign_topk(xs, self.centers, self.width, "euclidean", offsets=p32, **self.search_kw)
        ids, values = ids[:count], values[:count].astype(np.float64)
        self.ids[rows] = ids
        self.benefit[rows] = values + p32[ids]
        # A centre not listed had value <= the last listed one (float32-rounded: a little slack).
        last = values[:, -1]
        self.bound[rows] = -np.inf if self.complete else last + 1e-6 * np.abs(last)


def _auction(lists, n: int, m: int, spread: float, rel_eps: float, *, eps_final: float | None = None,
             eps_start: float | None = None) -> np.ndarray:
    """The ε-scaled auction (module docstring) over the points' centre ``lists``, ε from ``eps_start`` (default a
    quarter of the cost range) down to ``eps_final`` (default ``rel_eps`` x range / N); ids [N] int32."""
    cap = n // m
    if spread == 0.0:
        return np.repeat(np.arange(m, dtype=np.int32), cap)
    eps_final = rel_eps * spread / n if eps_final is None else eps_final
    eps = max(spread / EPS_FACTOR if eps_start is None else eps_start / EPS_FACTOR, eps_final)
    heap_price = np.zeros((m, cap))  # each centre's slot prices, a min-heap per row; kept across phases
    heap_owner = np.full((m, cap), -1, np.int64)
    centre_of = np.full(n, -1, np.int64)
    while True:
        heap_owner[:] = -1
        centre_of[:] = -1
        free = np.arange(n, dtype=np.int64)
        while free.size:
            waiting = _bid_until_waiting(free, lists.ids, lists.benefit, lists.bound, heap_price, heap_owner,
                                         centre_of, eps, lists.x, lists.centers64, lists.c_sq, lists.search_here_max,
                                         lists.searched_again, lists.fresh)
            if waiting.size:
                lists.search_again(waiting, heap_price[:, 0].copy())
            free = waiting
        if eps <= eps_final:
            break
        eps = max(eps / EPS_FACTOR, eps_final)
    return centre_of.astype(np.int32)


@numba.njit(cache=False)
def _search_one(i, x, centers, c_sq, prices, ids, benefit, bound):
    """Point ``i``'s list at the current ``prices``, on the host: [M] float64 values."""
    m, width = centers.shape[0], ids.shape[1]
    b = 2.0 * (centers @ x[i].astype(np.float64)) - c_sq
    values = b - prices
    order = np.argsort(-values, kind="mergesort")
    for j in range(width):
        ids[i, j] = order[j]
        benefit[i, j] = b[order[j]]
    bound[i] = values[order[width - 1]] if width < m else -np.inf


@numba.njit(cache=False)
def _bid_until_waiting(free, ids, benefit, bound, heap_price, heap_owner, centre_of, eps, x, centers, c_sq,
                       search_here_max, searched_again, fresh):
    """Gauss-Seidel bidding from the ``free`` points until every free point is assigned or waits for a new
    list (its second-best listed value below its bound); a few waiting points (at most ``search_here_max``
    when the others are done) are searched again here, more are returned to be searched on the mesh."""
    cap = heap_price.shape[1]
    width = ids.shape[1]
    stack = list(free)
    waiting = [np.int64(0) for _ in range(0)]
    while True:
        if not len(stack):
            if len(waiting) == 0 or len(waiting) > search_here_max:
                break
            prices = heap_price[:, 0].copy()
            searched_again[0] += len(waiting)
            for w in waiting:
                _search_one(w, x, centers, c_sq, prices, ids, benefit, bound)
                fresh[w] = True
                stack.append(w)
            waiting.clear()
        i = stack.pop()
        best, best_value, other = -1, -np.inf, -np.inf
        for j in range(width):
            v = benefit[i, j] - heap_price[ids[i, j], 0]
            if v > best_value:
                other = best_value
                best, best_value = j, v
            elif v > other:
                other = v
        if fresh[i]:  # listed at the current prices: its best two are exact (to rounding) whatever the bound
            fresh[i] = False
        elif other < bound[i]:
            waiting.append(i)
            continue
        c = ids[i, best]
        # The runner-up: the best other centre, or the second-cheapest slot of the same one.
        if cap >= 3:
            second = min(heap_price[c, 1], heap_price[c, 2])
        elif cap == 2:
            second = heap_price[c, 1]
        else:
            second = np.inf
        runner_up = max(other, benefit[i, best] - second)
        if runner_up == -np.inf:  # one slot in all: the smallest raise
            runner_up = best_value
        bid = heap_price[c, 0] + best_value - runner_up + eps
        held = heap_owner[c, 0]
        if held >= 0:
            centre_of[held] = -1
            stack.append(held)
        centre_of[i] = c
        # The cheapest slot takes the bid: replace the heap's root and sift it down.
        pos = 0
        while True:
            left = 2 * pos + 1
            if left >= cap:
                break
            child = left
            if left + 1 < cap and heap_price[c, left + 1] < heap_price[c, left]:
                child = left + 1
            if heap_price[c, child] >= bid:
                break
            heap_price[c, pos] = heap_price[c, child]
            heap_owner[c, pos] = heap_owner[c, child]
            pos = child
        heap_price[c, pos] = bid
        heap_owner[c, pos] = i
    out = np.empty(len(waiting), np.int64)
    for k in range(len(waiting)):
        out[k] = waiting[k]
    return out


def squared_distances(points: np.ndarray, centers: np.ndarray) -> np.ndarray:
    """[N, K] float64 squared euclidean distances (the cost of a balanced assignment)."""
    x = np.asarray(points, np.float64)
    c = np.asarray(centers, np.float64)
    return np.maximum((x * x).sum(1)[:, None] - 2.0 * x @ c.T + (c * c).sum(1)[None, :], 0.0)


def _unit(c: np.ndarray) -> np.ndarray:
    return c / np.maximum(np.linalg.norm(c, axis=1, keepdims=True), 1e-12)


def _chosen_costs(x: np.ndarray, centers: np.ndarray, ids: np.ndarray, rows: int = 65536) -> np.ndarray:
    """[N] float64 squared distance of every point to its assigned centre, a block of rows at a time."""
    out = np.empty(len(x))
    for lo in range(0, len(x), rows):
        d = x[lo:lo + rows] - centers[ids[lo:lo + rows]]
        out[lo:lo + rows] = np.einsum("ij,ij->i", d, d, dtype=np.float64)
    return out


def balanced_kmeans(points: np.ndarray, k: int, *, num_iters: int, metric: str, init: np.ndarray,
                    tol: float | None = None, progress: Callable[[int, float, float], None] | None = None,
                    checkpoints=None, mesh: Mesh | None = None, candidates: int = DEFAULT_CANDIDATES,
                    assign_stats: list | None = None):
    """k-means whose every assignment (each iteration's and the returned one) gives each centre exactly N / k
    points (``balanced_assign_points`` on ``mesh``). ``checkpoints`` (a ``state.CenterCheckpoints``) saves the
    centres after every iteration and resumes from the newest save. ``assign_stats``, when given, receives each
    assignment's ``stats``. Returns a ``result.KMeansResult``."""

    x = np.asarray(points, np.float32)
    if x.shape[0] % k:
        raise ValueError(f"balanced k-means needs N divisible by k; got N={x.shape[0]}, k={k}")
    cap = x.shape[0] // k
    centers = np.asarray(init, np.float32)
    if metric == "cosine":
        centers = _unit(centers)

    def assign(centers):  # the centres are already unit for "cosine"
        stats = {}
        ids = balanced_assign_points(x, centers, metric="euclidean", mesh=mesh, candidates=candidates, stats=stats)
        if assign_stats is not None:
            assign_stats.append(stats)
        return ids

    previous, iters, done = np.nan, 0, False
    restored = checkpoints.restore() if checkpoints is not None else None
    if restored is not None:
        centers, iters, previous, done = restored
    for iteration in range(iters, 0 if done else num_iters):
        ids = assign(centers)
        current = float(_chosen_costs(x, centers, ids).mean())
        if progress is not None:
            progress(iteration, 1.0, current)
        # Every cluster has exactly cap points: the means are one sort and one reshape away.
        members = x[np.argsort(ids, kind="stable")].reshape(k, cap, x.shape[1])
        centers = (members.sum(axis=1, dtype=np.float64) / cap).astype(np.float32)
        del members
        if metric == "cosine":
            centers = _unit(centers)
        iters = iteration + 1
        done = tol is not None and np.isfinite(previous) and previous - current <= tol * max(previous, 1e-30)
        previous = current
        if checkpoints is not None:
            checkpoints.save(centers, iters, previous, done)
        if done:
            break
    ids = assign(centers)
    return KMeansResult(centers=centers, assignments=ids, inertia=float(_chosen_costs(x, centers, ids).mean()),
                        sizes=np.bincount(ids, minlength=k).astype(np.int64), num_iters_run=iters)
