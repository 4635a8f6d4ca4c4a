"""Public nearest-centre assignment: ``assign`` (top-1) and ``assign_topk`` (the l nearest, ordered), on an
array of features, chunk by chunk, sharded as ``blocked`` describes (no [N, K] array)."""
from __future__ import annotations

import functools

import jax
import numpy as np
from jax.sharding import Mesh

from clus_jax.clustering.blocked import (DEFAULT_BLOCK_K, DEFAULT_CHUNK_ROWS, Layout, center_sqnorms, check_metric,
                                         make_layout, pad_centers, topl_on_mesh)
from clus_jax.parallel.multihost import to_host


@functools.lru_cache(maxsize=64)
def _topl_fn(layout: Layout, l: int, metric: str):
    def fn(x, centers, center_sq):
        s, i = topl_on_mesh(layout, x, centers, center_sq, l, metric)
        return i, s

    mapped = jax.shard_map(fn, mesh=layout.mesh,
                           in_specs=(layout.points_spec(), layout.centers_spec(), layout.centers_spec()),
                           out_specs=(layout.points_spec(), layout.points_spec()), check_vma=False)
    return jax.jit(mapped)


def _chunks_of(features: np.ndarray, rows: int):
    for lo in range(0, features.shape[0], rows):
        yield lo, features[lo:lo + rows]


def assign_topk(features: np.ndarray, centers: np.ndarray, l: int, metric: str = "euclidean", *,
                mesh: Mesh | None = None, block_k: int = DEFAULT_BLOCK_K, chunk_rows: int = DEFAULT_CHUNK_ROWS,
                offsets: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The ``l`` nearest centres of every row, nearest first: (ids [N, l] int32, similarities [N, l]).

    Similarities are ``x.c`` with unit centres for ``"cosine"`` and minus the squared distance for
    ``"euclidean"``. ``offsets`` (``"euclidean"`` only), a per-centre price, is subtracted from every
    similarity, so the ranking is by similarity minus price, as an auction bids. Rows are processed ``chunk_rows`` at a time (split over the mesh's data
    axes), centres ``block_k`` at a time per centre shard."""
    check_metric(metric)
    features = np.asarray(features)
    centers = np.asarray(centers)
    if offsets is not None and (metric != "euclidean" or np.shape(offsets) != (centers.shape[0],)):
        raise ValueError(f"offsets must be [{centers.shape[0]}] with metric 'euclidean'; got {np.shape(offsets)}, "
                         f"{metric!r}")
    if not 1 <= l <= centers.shape[0]:
        raise ValueError(f"l={l} must lie in [1, {centers.shape[0]}] (the number of centres)")
    layout = make_layout(mesh, centers.shape[0], block_k)
    c = pad_centers(centers, layout, metric)
    c_sq = jax.jit(center_sqnorms, out_shardings=layout.sharding(layout.centers_spec()))(c)
    if offsets is not None:  # the blocked euclidean score is 2 x.c - |c|^2: the offset joins |c|^2
        off = np.zeros(layout.padded_k, np.float32)
        off[:centers.shape[0]] = offsets
        c_sq = c_sq + jax.device_put(off, layout.sharding(layout.centers_spec()))
    fn = _topl_fn(layout, l, metric)
    rows = -(-min(chunk_rows, max(len(features), 1)) // layout.point_shards) * layout.point_shards
    ids = np.empty((len(features), l), np.int32)
    sims = np.empty((len(features), l), np.float32)
    x_sharding = layout.sharding(layout.points_spec())
    for lo, chunk in _chunks_of(features, rows):
        n = chunk.shape[0]
        padded = np.zeros((rows, features.shape[1]), np.float32)
        padded[:n] = chunk
        i, s = fn(jax.device_put(padded, x_sharding), c, c_sq)
        ids[lo:lo + n] = to_host(i)[:n]
        s = to_host(s)[:n]
        if metric == "euclidean":  # score = 2 x.c - |c|^2 = |x|^2 - |x - c|^2
            sq = np.sum(np.square(chunk.astype(np.float32)), axis=1, keepdims=True)
            s = s - sq
        sims[lo:lo + n] = s
    return ids, sims


def assign(features: np.ndarray, centers: np.ndarray, metric: str = "euclidean", *,
           mesh: Mesh | None = None, block_k: int = DEFAULT_BLOCK_K,
           chunk_rows: int = DEFAULT_CHUNK_ROWS) -> np.ndarray:
    """Nearest centre of every row, ids [N] int32 (``"cosine"``: largest dot product with unit centres)."""
    return assign_topk(features, centers, 1, metric, mesh=mesh, block_k=block_k, chunk_rows=chunk_rows)[0][:, 0]
