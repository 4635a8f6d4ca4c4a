"""Lloyd's k-means on the device mesh, streaming over points that need not fit in memory.

One iteration is one pass over the points in fixed-size chunks. Per chunk, every device finds the nearest
centre of its rows among all centres (``assign.topl_on_mesh``: centres split over the centre axes, blocked
matmul, running top-1) and adds its rows into per-device partial sums of its own centre shard (a segment
sum, float32). At the end of the pass the partial sums are reduced over the data axes and the centres
become the means; empty clusters are re-seeded by splitting the largest clusters (faiss's rule: the donor
centre c gives c (1 + s eps) to the empty slot and keeps c (1 - s eps), s alternating +1/-1 over the
dimensions, eps = 1/1024). The returned assignments, sizes and inertia are those of the returned centres
(one last pass).

The state after every chunk is (centres, iteration, chunk, partial sums, counts, inertia so far);
``checkpoint_dir`` saves it with orbax at the end of every pass and every ``checkpoint_every_s`` seconds
within one, and a new call with the same arguments resumes from the newest save and reaches the same
centres as an uninterrupted run (the chunks are summed in the same order).
"""
from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from clus_jax.clustering import blocked
from clus_jax.clustering import balanced as balanced_lib
from clus_jax.clustering import state as state_lib
from clus_jax.clustering.result import KMeansResult
from clus_jax.clustering.stream import PointStream
from clus_jax.parallel import collectives
from clus_jax.parallel.multihost import to_host

INITS = ("random", "kmeans++")
SPLIT_EPS = 1.0 / 1024.0
#: Most empty clusters re-seeded per iteration (the rest are re-seeded in the following ones), so the
#: re-seeding gathers a bounded number of centre rows.
MAX_RESEED = 4096
#: Points sampled for k-means++ (times k).
KMEANS_PP_SAMPLE_PER_CENTER = 8

Progress = Callable[[int, float, float], None]




# ---------------------------------------------------------------------------------------------- steps

@functools.lru_cache(maxsize=32)
def accumulate_fn(layout: blocked.Layout, metric: str):
    """jit((x [C, D], valid [C], centers, center_sq, sums [P, Kp, D], counts [P, Kp]) ->
    (sums, counts, chunk inertia sum, ids [C])): one chunk's assignment and segment sums."""

    def local(x, valid, centers, center_sq, sums, counts):
        score, ids = blocked.topl_on_mesh(layout, x, centers, center_sq, 1, metric)
        score, ids = score[:, 0], ids[:, 0]
        xf = x.astype(jnp.float32)
        sq = jnp.sum(xf * xf, axis=1)
        dist = sq - score if metric == "euclidean" else sq + 1.0 - 2.0 * score
        dist = jnp.where(valid, jnp.maximum(dist, 0.0), 0.0)
        local_id = ids - collectives.shard_offset(layout.local_k, layout.center_axes)
        mine = valid & (local_id >= 0) & (local_id < layout.local_k)
        # Segment sums added in place into the (donated) accumulators; other shards' ids fall out of range.
        seg = jnp.where(mine, local_id, layout.local_k)
        sums = sums.at[0, seg].add(xf, mode="drop")
        counts = counts.at[0, seg].add(1, mode="drop")
        total = collectives.all_sum(jnp.sum(dist), layout.point_axes)
        return sums, counts, total, ids

    pts, ctr = layout.points_spec(), layout.centers_spec()
    acc = layout.accumulator_spec()
    mapped = jax.shard_map(local, mesh=layout.mesh, in_specs=(pts, pts, ctr, ctr, acc, acc),
                           out_specs=(acc, acc, P(), pts), check_vma=False)
    return jax.jit(mapped, donate_argnums=(4, 5))


def zero_accumulators(layout: blocked.Layout, dim: int) -> tuple[jax.Array, jax.Array]:
    sharding = layout.sharding(layout.accumulator_spec())
    # jnp.zeros(device=...) is cached by shape; a fresh jitted lambda would compile again every iteration.
    sums = jnp.zeros((layout.point_shards, layout.padded_k, dim), jnp.float32, device=sharding)
    counts = jnp.zeros((layout.point_shards, layout.padded_k), jnp.int32, device=sharding)
    return sums, counts


def split_signs(dim: int) -> jax.Array:
    return jnp.where(jnp.arange(dim) % 2 == 0, 1.0, -1.0).astype(jnp.float32)


@functools.lru_cache(maxsize=32)
def update_fn(layout: blocked.Layout, metric: str):
    """jit((centers, sums, counts) -> (centers, center_sq, counts [Kp])): means, then faiss-style splits of
    the largest clusters into the empty ones (at most ``MAX_RESEED`` per call)."""
    k, padded_k = layout.k, layout.padded_k
    reseed = min(MAX_RESEED, k)
    ctr = layout.sharding(layout.centers_spec())

    def update(centers, sums, counts):
        total = jnp.sum(sums, axis=0)
        count = jnp.sum(counts, axis=0)
        real = jnp.arange(padded_k) < k
        new = jnp.where(count[:, None] > 0, total / jnp.maximum(count, 1)[:, None].astype(jnp.float32), centers)
        if metric == "cosine":
            new = new / jnp.maximum(jnp.linalg.norm(new, axis=1, keepdims=True), 1e-12)
        # Empty clusters (lowest ids first) take half of the largest ones (largest first, lower id on ties).
        empty = real & (count == 0)
        _, empty_ids = jax.lax.top_k(jnp.where(empty, -jnp.arange(padded_k), -padded_k - 1).astype(jnp.int32), reseed)
        n_empty = jnp.sum(empty)
        _, donor_ids = jax.lax.top_k(jnp.where(real, count, -1), reseed)
        use = jnp.arange(reseed) < n_empty
        donors = new[donor_ids]
        signs = split_signs(centers.shape[1])
        grow, shrink = donors * (1.0 + SPLIT_EPS * signs), donors * (1.0 - SPLIT_EPS * signs)
        drop = jnp.int32(padded_k)  # out of range: mode='drop' ignores the write
        new = new.at[jnp.where(use, donor_ids, drop)].set(shrink, mode="drop")
        new = new.at[jnp.where(use, empty_ids, drop)].set(grow, mode="drop")
        if metric == "cosine":
            new = new / jnp.maximum(jnp.linalg.norm(new, axis=1, keepdims=True), 1e-12)
        new = jnp.where(real[:, None], new, 0.0)
        return new, blocked.center_sqnorms(new), count

    return jax.jit(update, out_shardings=(ctr, ctr, ctr))


# --------------------------------------------------------------------------------------------- init

def initial_centers(stream: PointStream, k: int, init, metric: str, seed: int) -> np.ndarray:
    """[k, D] float32 initial centres: given, k distinct random points, or k-means++ on a sample of
    ``KMEANS_PP_SAMPLE_PER_CENTER`` x k points (k sequential steps of O(sample x D) each: for k in the
    hundreds of thousands, use ``"random"``)."""
    if not isinstance(init, str):
        c = np.asarray(init, np.float32)
        if c.shape != (k, stream.dim):
            raise ValueError(f"init centres have shape {c.shape}; expected ({k}, {stream.dim})")
        return c
    if init not in INITS:
        raise ValueError(f"init={init!r} is not one of {list(INITS)} or an array of initial centres")
    if k > stream.num_rows:
        raise ValueError(f"k={k} exceeds the number of points {stream.num_rows}")
    rng = np.random.default_rng(seed)
    if init == "random":
        return stream.rows_at(np.sort(rng.choice(stream.num_rows, k, replace=False)))
    sample_size = min(stream.num_rows, max(k, KMEANS_PP_SAMPLE_PER_CENTER * k))
    sample = stream.rows_at(np.sort(rng.choice(stream.num_rows, sample_size, replace=False)))
    if metric == "cosine":
        sample = sample / np.maximum(np.linalg.norm(sample, axis=1, keepdims=True), 1e-12)
    picks = np.asarray(_kmeans_pp(jnp.asarray(sample), k, jax.random.key(seed)))
    return sample[picks]


@functools.partial(jax.jit, static_argnums=(1,))
def _kmeans_pp(sample: jax.Array, k: int, key: jax.Array) -> jax.Array:
    """Indices of k sample rows chosen by k-means++ (Arthur and Vassilvitskii 2007): each next centre with
    probability proportional to its squared distance to the nearest chosen one."""
    sq = jnp.sum(sample * sample, axis=1)
    first = jax.random.randint(jax.random.fold_in(key, 0), (), 0, sample.shape[0])

    def dist_to(i):
        return jnp.maximum(sq - 2.0 * sample @ sample[i] + sq[i], 0.0)

    def body(j, carry):
        picks, best = carry
        logits = jnp.where(best > 0, jnp.log(jnp.maximum(best, 1e-30)), -jnp.inf)
        logits = jnp.where(jnp.any(best > 0), logits, 0.0)  # all points covered: uniform
        nxt = jax.random.categorical(jax.random.fold_in(key, j), logits)
        return picks.at[j].set(nxt), jnp.minimum(best, dist_to(nxt))

    picks = jnp.zeros((k,), jnp.int32).at[0].set(first)
    picks, _ = jax.lax.fori_loop(1, k, body, (picks, dist_to(first)))
    return picks


# --------------------------------------------------------------------------------------------- driver

def _chunk_rows(requested: int, stream: PointStream, layout: blocked.Layout) -> int:
    rows = min(requested, stream.num_rows)
    return -(-rows // layout.point_shards) * layout.point_shards


def kmeans(points: np.ndarray | Iterable[np.ndarray], k: int, *, num_iters: int = 20, metric: str = "euclidean",
           init="random", seed: int = 0, mesh: Mesh | None = None, tol: float | None = None,
           balanced: bool = False, checkpoint_dir: str | None = None, progress: Progress | None = None,
           block_k: int = blocked.DEFAULT_BLOCK_K, chunk_rows: int = blocked.DEFAULT_CHUNK_ROWS,
           checkpoint_every_s: float = 60.0) -> KMeansResult:
    """k-means of ``points`` ([N, D] array or re-iterable of [n_i, D] shards) into ``k`` centres.

    See the package docstring for the arguments. ``block_k`` centres are scored at a time per device and
    ``chunk_rows`` points per step; ``checkpoint_every_s`` spaces the saves within a pass."""
    blocked.check_metric(metric)
    if k < 1:
        raise ValueError(f"k={k} must be positive")
    if num_iters < 0:
        raise ValueError(f"num_iters={num_iters} must be >= 0")
    stream = PointStream(points)
    if balanced:  # the points in memory, the distances searched on the mesh, the auction on the host (balanced.py)
        checkpoints = state_lib.CenterCheckpoints(checkpoint_dir, dict(k=k, dim=stream.dim, rows=stream.num_rows,
                                                                       metric=metric, seed=seed, num_iters=num_iters,
                                                                       balanced=True))
        return balanced_lib.balanced_kmeans(stream.materialise(), k, num_iters=num_iters, metric=metric,
                                            init=initial_centers(stream, k, init, metric, seed), tol=tol,
                                            progress=progress, checkpoints=checkpoints, mesh=mesh)
    layout = blocked.make_layout(mesh, k, block_k)
    rows = _chunk_rows(chunk_rows, stream, layout)
    num_chunks = stream.num_chunks(rows)
    acc_fn, upd_fn = accumulate_fn(layout, metric), update_fn(layout, metric)
    x_sharding = layout.sharding(layout.points_spec())

    store = state_lib.KMeansCheckpoints(checkpoint_dir, layout, stream.dim,
                                        fingerprint=dict(k=k, dim=stream.dim, rows=stream.num_rows, metric=metric,
                                                         chunk_rows=rows, seed=seed, num_iters=num_iters))
    restored = store.restore()
    if restored is None:
        centers = blocked.pad_centers(initial_centers(stream, k, init, metric, seed), layout, metric)
        center_sq = jax.jit(blocked.center_sqnorms, out_shardings=layout.sharding(layout.centers_spec()))(centers)
        sums, counts = zero_accumulators(layout, stream.dim)
        iteration, start_chunk, inertia_sum, previous, done = 0, 0, 0.0, math.nan, False
    else:
        centers, center_sq, sums, counts = restored.centers, restored.center_sq, restored.sums, restored.counts
        iteration, start_chunk, inertia_sum = restored.iteration, restored.chunk, restored.inertia_sum
        previous, done = restored.previous_inertia, restored.done

    last_save = time.monotonic()
    while iteration < num_iters and not done:
        for c, chunk, n in stream.chunks(rows, start_chunk):
            valid = np.arange(rows) < n
            sums, counts, total, _ = acc_fn(jax.device_put(chunk, x_sharding), jax.device_put(valid, x_sharding),
                                            centers, center_sq, sums, counts)
            inertia_sum += float(total)
            if progress is not None:
                progress(iteration, (c + 1) / num_chunks, inertia_sum / min((c + 1) * rows, stream.num_rows))
            if checkpoint_dir and c + 1 < num_chunks and time.monotonic() - last_save >= checkpoint_every_s:
                store.save(state_lib.KMeansState(centers, center_sq, sums, counts, iteration, c + 1, inertia_sum,
                                                 previous, False))
                last_save = time.monotonic()
        centers, center_sq, _ = upd_fn(centers, sums, counts)
        current = inertia_sum / stream.num_rows
        iteration += 1
        done = tol is not None and math.isfinite(previous) and (previous - current) <= tol * max(previous, 1e-30)
        previous, start_chunk, inertia_sum = current, 0, 0.0
        sums, counts = zero_accumulators(layout, stream.dim)
        if checkpoint_dir:
            store.save(state_lib.KMeansState(centers, center_sq, sums, counts, iteration, 0, 0.0, previous, done))
            last_save = time.monotonic()

    # The assignments, sizes and inertia of the final centres: one more pass.
    assignments = np.empty(stream.num_rows, np.int32)
    inertia_sum = 0.0
    for c, chunk, n in stream.chunks(rows):
        valid = np.arange(rows) < n
        sums, counts, total, ids = acc_fn(jax.device_put(chunk, x_sharding), jax.device_put(valid, x_sharding),
                                          centers, center_sq, sums, counts)
        inertia_sum += float(total)
        assignments[c * rows:c * rows + n] = to_host(ids)[:n]
    sizes = to_host(counts).sum(axis=0)[:k].astype(np.int64)
    return KMeansResult(centers=to_host(centers)[:k], assignments=assignments,
                        inertia=inertia_sum / stream.num_rows, sizes=sizes, num_iters_run=iteration)
