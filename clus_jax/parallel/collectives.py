"""Collectives over mesh axes that may be absent, and the shard_map island the losses run in.

Every loss is written once for a *local* block of rows (and, for prototype scores, of columns). The helpers
here take the mesh axis name(s) that block is sharded over: a name, a sequence of names, or None (an empty
sequence counts as None). With None they are the ordinary single-device reductions; inside ``jax.shard_map``
they become ``psum``/``pmax``/``all_gather`` collectives over those axes, so one function body serves both.

``shard_map_island`` wraps a loss in ``jax.shard_map`` on a mesh with the batch rows split over the batch axes,
so a device computes only its own rows and the (replicated) result equals the single-device value.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

#: Mesh axis name(s) an array dimension is sharded over; None (or an empty sequence) means not sharded.
AxisName = str | Sequence[str] | None
Axes = int | Sequence[int] | None


def join_axis_names(*names: AxisName) -> str | tuple[str, ...] | None:
    """Concatenates axis names (each a name, a sequence of names, or None) into one collective axis spec.

    Empty sequences count as None, so the result is None, a single name, or a tuple of two or more.
    """
    flat: list[str] = []
    for name in names:
        if name is None:
            continue
        flat.extend((name,) if isinstance(name, str) else name)
    if not flat:
        return None
    return flat[0] if len(flat) == 1 else tuple(flat)


def axis_size(axis_name: AxisName) -> int:
    """Number of shards along ``axis_name``: 1 when None, else the bound mesh axes' size (inside ``shard_map``)."""
    axis_name = join_axis_names(axis_name)
    return 1 if axis_name is None else lax.axis_size(axis_name)


def shard_offset(block_size: int, axis_name: AxisName) -> jax.Array:
    """Global index of this shard's first element along a dimension split in equal blocks over ``axis_name``.

    For rows split over the batch axes, ``shard_offset(local_rows, batch_axes)``; int32, 0 when None.
    """
    axis_name = join_axis_names(axis_name)
    return jnp.int32(0) if axis_name is None else lax.axis_index(axis_name) * block_size


def all_sum(x: jax.Array, axis_name: AxisName) -> jax.Array:
    """``x`` summed over the shards of ``axis_name`` (``lax.psum``); ``x`` itself when None."""
    axis_name = join_axis_names(axis_name)
    return x if axis_name is None else lax.psum(x, axis_name)


def all_max(x: jax.Array, axis_name: AxisName) -> jax.Array:
    """Elementwise maximum of ``x`` over the shards of ``axis_name`` (``lax.pmax``); ``x`` itself when None."""
    axis_name = join_axis_names(axis_name)
    return x if axis_name is None else lax.pmax(x, axis_name)


def all_min(x: jax.Array, axis_name: AxisName) -> jax.Array:
    """Elementwise minimum of ``x`` over the shards of ``axis_name`` (``lax.pmin``); ``x`` itself when None."""
    axis_name = join_axis_names(axis_name)
    return x if axis_name is None else lax.pmin(x, axis_name)


def all_gather_rows(x: jax.Array, axis_name: AxisName) -> jax.Array:
    """Every shard's rows of ``x`` concatenated along axis 0, in shard order; ``x`` itself when None."""
    axis_name = join_axis_names(axis_name)
    return x if axis_name is None else lax.all_gather(x, axis_name, axis=0, tiled=True)


def global_sum(x: jax.Array, axis: Axes, axis_name: AxisName = None) -> jax.Array:
    """``jnp.sum(x, axis, keepdims=True)`` where the reduced axes may be sharded over ``axis_name``."""
    return all_sum(jnp.sum(x, axis=axis, keepdims=True), axis_name)


def global_max(x: jax.Array, axis: Axes, axis_name: AxisName = None) -> jax.Array:
    """``jnp.max(x, axis, keepdims=True)`` over axes sharded on ``axis_name``, as a constant (no gradient)."""
    return all_max(lax.stop_gradient(jnp.max(x, axis=axis, keepdims=True)), axis_name)


def distributed_logsumexp(x: jax.Array, axis: Axes, axis_name: AxisName = None) -> jax.Array:
    """Max-shifted ``log(sum(exp(x)))`` over ``axis`` (kept as size-1 dims), sharded over ``axis_name``.

    The shift is the global maximum (``pmax`` of the local maxima); it is treated as a constant, which
    leaves the value and the gradient (a softmax) unchanged. Slices that are entirely ``-inf`` give
    ``-inf`` rather than NaN.
    """
    m = global_max(x, axis, axis_name)
    m = jnp.where(jnp.isfinite(m), m, jnp.zeros_like(m))
    return m + jnp.log(global_sum(jnp.exp(x - m), axis, axis_name))


def distributed_softmax(x: jax.Array, axis: Axes, axis_name: AxisName = None) -> jax.Array:
    """Max-shifted softmax over ``axis`` (sharded over ``axis_name``), normalised in the linear domain."""
    e = jnp.exp(x - global_max(x, axis, axis_name))
    return e / global_sum(e, axis, axis_name)


def batch_spec(batch_axes: AxisName, *trailing: AxisName) -> P:
    """PartitionSpec of an array whose leading dimension is split over ``batch_axes``.

    ``trailing`` gives the mesh axes of the following dimensions, e.g. ``batch_spec(batch, 'tensor')`` for
    (B, K) scores with K split over 'tensor'.
    """
    return P(join_axis_names(batch_axes), *(join_axis_names(t) for t in trailing))


def _names_a_mesh_axis(specs: Any) -> bool:
    leaves = jax.tree.leaves(specs, is_leaf=lambda s: isinstance(s, P))
    return any(entry is not None for spec in leaves for entry in spec)


def shard_map_island(
    fn: Callable[..., Any],
    mesh: Mesh,
    batch_axes: AxisName,
    *args: Any,
    in_specs: Sequence[Any] | None = None,
    out_specs: Any = P(),
    axis_name_arg: str = "axis_name",
) -> Any:
    """``fn(*args, **{axis_name_arg: batch})`` inside ``jax.shard_map`` on ``mesh``, batch rows split over ``batch_axes``.

    ``batch`` is ``join_axis_names(batch_axes)``; ``fn`` receives its local blocks and must return values that
    are the same on every shard (global losses and metrics), hence ``out_specs=P()`` (replicated) by default.

    Args:
      fn: the loss on local blocks; takes the batch axis name(s) as keyword ``axis_name_arg`` (e.g.
        ``'axis_name'`` for the contrastive losses, ``'batch_axis_name'`` for the Sinkhorn ones).
      mesh: the device mesh (``LossContext.mesh``).
      batch_axes: mesh axes the batch is split over (``LossContext.batch_axes``); None or () for none.
      args: the arguments, global arrays or pytrees of them.
      in_specs: one PartitionSpec (or pytree prefix of specs) per argument; None splits the leading axis of
        every argument over the batch axes (``batch_spec(batch_axes)``). Use ``P()`` for replicated values
        such as a logit scale, and ``batch_spec(batch_axes, 'tensor')`` or ``P('tensor')`` for arrays that are
        also split over other axes.
      out_specs: the PartitionSpec (or pytree prefix) of the result.
      axis_name_arg: the keyword under which ``fn`` receives the batch axis name(s).

    When nothing is split (no batch axes and no spec names a mesh axis) ``fn`` is called directly.
    """
    batch = join_axis_names(batch_axes)
    if in_specs is None:
        in_specs = tuple(P(batch) for _ in args)
    in_specs = tuple(in_specs)
    if len(in_specs) != len(args):
        raise ValueError(f"shard_map_island: {len(args)} arguments but {len(in_specs)} in_specs")
    if batch is None and not _names_a_mesh_axis(in_specs):
        return fn(*args, **{axis_name_arg: None})
    mapped = jax.shard_map(lambda *a: fn(*a, **{axis_name_arg: batch}), mesh=mesh, in_specs=in_specs,
                           out_specs=out_specs)
    return mapped(*args)
