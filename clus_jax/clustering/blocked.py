"""Nearest-centre search on the device mesh, the core of k-means and assignment: a blocked matmul with a running top-l per block of centres.

Points are split over the mesh's data axes (``data``, ``fsdp``) and centres over the remaining ones
(``tensor``), so a device holds [n / P, D] points and [K / T, D] centres. Each device scans its centres
in blocks of ``block_k``, keeping the best l (score, id) per point; the per-device candidates are then
combined over the centre axes (``pmax``/``pmin`` for l = 1, an all-gather of [n, l] candidates and a
top-l otherwise). No [N, K] array is formed: the largest score array is [n / P, block_k].

Scores are similarities (larger is nearer): ``2 x.c - |c|^2`` for ``"euclidean"`` (so the squared
distance is ``|x|^2 - score``) and ``x.c`` with unit centres for ``"cosine"``.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from clus_jax.parallel import collectives
from clus_jax.parallel.mesh import BATCH_AXES, MESH_AXES

METRICS = ("euclidean", "cosine")
DEFAULT_BLOCK_K = 1024
DEFAULT_CHUNK_ROWS = 8192


def check_metric(metric: str) -> str:
    if metric not in METRICS:
        raise ValueError(f"metric={metric!r} is not one of {list(METRICS)}")
    return metric


def single_device_mesh() -> Mesh:
    """A ('data', 'fsdp', 'tensor') mesh of this process's first device: the unsharded case of the same code path
    (each process of a multi-process job computes on its own device, not on process 0's)."""
    return Mesh(np.asarray(jax.local_devices()[:1]).reshape(1, 1, 1), MESH_AXES)


@dataclasses.dataclass(frozen=True)
class Layout:
    """How points and centres lie on a mesh: point axes, centre axes, their sizes, and the padded centre
    count (a multiple of centre shards x block size, so every device scans whole blocks)."""
    mesh: Mesh
    point_axes: tuple[str, ...]
    center_axes: tuple[str, ...]
    point_shards: int
    center_shards: int
    k: int
    block_k: int
    padded_k: int

    @property
    def local_k(self) -> int:
        return self.padded_k // self.center_shards

    def points_spec(self, *trailing) -> P:
        return P(collectives.join_axis_names(self.point_axes), *trailing)

    def centers_spec(self, *trailing) -> P:
        return P(collectives.join_axis_names(self.center_axes), *trailing)

    def sharding(self, spec: P) -> NamedSharding:
        return NamedSharding(self.mesh, spec)

    def accumulator_spec(self) -> P:
        """[point_shards, padded_k, ...] per-data-shard partial sums of each centre shard."""
        return P(collectives.join_axis_names(self.point_axes), collectives.join_axis_names(self.center_axes))


def make_layout(mesh: Mesh | None, k: int, block_k: int = DEFAULT_BLOCK_K) -> Layout:
    """Points over the mesh axes named in ``parallel.mesh.BATCH_AXES``, centres over every other axis."""
    mesh = mesh if mesh is not None else single_device_mesh()
    point_axes = tuple(a for a in mesh.axis_names if a in BATCH_AXES)
    center_axes = tuple(a for a in mesh.axis_names if a not in BATCH_AXES)
    point_shards = int(np.prod([mesh.shape[a] for a in point_axes]))
    center_shards = int(np.prod([mesh.shape[a] for a in center_axes]))
    per_shard = -(-k // center_shards)
    # A power of two when the shard is smaller than a block, so the block's argmax splits into small factors.
    block = max(1, min(block_k, 1 << (per_shard - 1).bit_length()))
    padded_k = center_shards * block * -(-per_shard // block)
    return Layout(mesh, point_axes, center_axes, point_shards, center_shards, k, block, padded_k)


def center_sqnorms(centers: jax.Array) -> jax.Array:
    c = centers.astype(jnp.float32)
    return jnp.sum(c * c, axis=-1)


def _block_scores(x: jax.Array, block: jax.Array, block_sq: jax.Array, metric: str) -> jax.Array:
    dot = lax.dot_general(x, block, (((1,), (1,)), ((), ())), precision=lax.Precision.HIGHEST,
                          preferred_element_type=jnp.float32)
    return 2.0 * dot - block_sq[None, :] if metric == "euclidean" else dot


def _argmax_small(v: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(max, first index of the max) over the few columns of ``v`` [n, w], as unrolled compares on columns."""
    best, index = v[:, 0], jnp.zeros(v.shape[0], jnp.int32)
    for w in range(1, v.shape[1]):
        better = v[:, w] > best
        best, index = jnp.where(better, v[:, w], best), jnp.where(better, jnp.int32(w), index)
    return best, index


def _factors(width: int, largest: int = 16) -> list[int]:
    """``width`` as a product of factors of at most ``largest`` where possible, largest first."""
    out, rest = [], width
    while rest > 1:
        f = next((f for f in range(min(largest, rest), 1, -1) if rest % f == 0), rest)
        out.append(f)
        rest //= f
    return out or [1]


def row_argmax(s: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(max, first index of the max) of every row of ``s`` [n, w], equal to ``jnp.max`` / ``jnp.argmax``.

    XLA:CPU's argmax (a two-operand reduction) runs at a few tens of millions of elements per second, 25x
    slower than a plain max. Here ``w`` is split into factors of at most 16: the max over the inner factors
    picks the best group, whose row is gathered and split again, so the index work is on [n, 16]-sized
    arrays only and the full [n, w] array is read by plain max reductions.
    """
    n = s.shape[0]
    widths = _factors(s.shape[1])
    offset = jnp.zeros(n, jnp.int32)
    for i, w in enumerate(widths[:-1]):
        rest = s.shape[1] // w
        groups = s.reshape(n, w, rest)
        _, g = _argmax_small(jnp.max(groups, axis=2))
        s = jnp.take_along_axis(groups, g[:, None, None], axis=1)[:, 0]
        offset = offset + g * rest
    best, last = _argmax_small(s)
    return best, offset + last


def local_topl(x: jax.Array, centers: jax.Array, center_sq: jax.Array, l: int, metric: str, *,
               first_id: jax.Array, k: int, block_k: int) -> tuple[jax.Array, jax.Array]:
    """Best ``l`` (scores, ids) of rows ``x`` [n, D] among local ``centers`` [kl, D] (global ids from
    ``first_id``; ids >= ``k`` are padding and never chosen), scanning ``block_k`` centres at a time.
    Ties go to the lower id."""
    n, d = x.shape
    num_blocks = centers.shape[0] // block_k
    blocks = centers.reshape(num_blocks, block_k, d)
    blocks_sq = center_sq.reshape(num_blocks, block_k)
    x = x.astype(jnp.float32)

    def body(carry, inputs):
        best_s, best_i = carry
        b, block, block_sq = inputs
        ids = first_id + b * block_k + jnp.arange(block_k, dtype=jnp.int32)
        s = jnp.where(ids[None, :] < k, _block_scores(x, block.astype(jnp.float32), block_sq, metric), -jnp.inf)
        if l == 1:
            s_b, j = row_argmax(s)
            better = s_b[:, None] > best_s  # strict: the earlier (lower) id keeps a tie
            return (jnp.where(better, s_b[:, None], best_s), jnp.where(better, ids[j][:, None], best_i)), None
        all_s = jnp.concatenate([best_s, s], axis=1)
        all_i = jnp.concatenate([best_i, jnp.broadcast_to(ids, (n, block_k))], axis=1)
        top_s, pos = lax.top_k(all_s, l)  # stable: the running (lower-id) candidates win ties
        return (top_s, jnp.take_along_axis(all_i, pos, axis=1)), None

    init = (jnp.full((n, l), -jnp.inf, jnp.float32), jnp.full((n, l), jnp.iinfo(jnp.int32).max, jnp.int32))
    (best_s, best_i), _ = lax.scan(body, init, (jnp.arange(num_blocks, dtype=jnp.int32), blocks, blocks_sq))
    return best_s, best_i


def combine_topl(scores: jax.Array, ids: jax.Array, l: int, axis_name) -> tuple[jax.Array, jax.Array]:
    """The best ``l`` over the centre shards of ``axis_name`` of each shard's best ``l`` (ties: lower id)."""
    if collectives.join_axis_names(axis_name) is None:
        return scores, ids
    if l == 1:
        best = collectives.all_max(scores, axis_name)
        cand = jnp.where(scores == best, ids, jnp.iinfo(jnp.int32).max)
        return best, collectives.all_min(cand, axis_name)
    name = collectives.join_axis_names(axis_name)
    all_s = lax.all_gather(scores, name, axis=1, tiled=True)  # [n, T*l], shard order = id order
    all_i = lax.all_gather(ids, name, axis=1, tiled=True)
    top_s, pos = lax.top_k(all_s, l)
    return top_s, jnp.take_along_axis(all_i, pos, axis=1)


def topl_on_mesh(layout: Layout, x: jax.Array, centers: jax.Array, center_sq: jax.Array, l: int,
                 metric: str) -> tuple[jax.Array, jax.Array]:
    """Inside ``shard_map``: local rows' best ``l`` over all centres (every centre shard agrees)."""
    first_id = collectives.shard_offset(layout.local_k, layout.center_axes)
    s, i = local_topl(x, centers, center_sq, l, metric, first_id=first_id, k=layout.k, block_k=layout.block_k)
    return combine_topl(s, i, l, layout.center_axes)


def pad_centers(centers: np.ndarray | jax.Array, layout: Layout, metric: str) -> jax.Array:
    """Centres as float32 [padded_k, D] split over the centre axes (unit rows for ``"cosine"``)."""
    c = jnp.asarray(centers, jnp.float32)
    if metric == "cosine":
        c = c / jnp.maximum(jnp.linalg.norm(c, axis=1, keepdims=True), 1e-12)
    c = jnp.pad(c, ((0, layout.padded_k - c.shape[0]), (0, 0)))
    return jax.device_put(c, layout.sharding(layout.centers_spec()))
