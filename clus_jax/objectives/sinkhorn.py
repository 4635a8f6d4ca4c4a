"""Sinkhorn-Knopp equipartition codes (SwAV's ``distributed_sinkhorn``), in the log domain.

Given prototype scores ``s`` of shape (B, K), the codes are the entropic optimal-transport plan between
the B samples (uniform mass 1/B each) and the K prototypes (uniform mass 1/K each) for the kernel
``exp(s / epsilon)``, approximated by a fixed number of alternating normalisations. The result is
rescaled so that every sample's code sums to 1.

The iteration order matches SwAV exactly: each iteration first normalises every prototype over the
(global) batch, then every sample over the prototypes; the last step is a sample normalisation, so the
returned rows sum to 1 exactly while the prototype marginals are only approximately B/K.

All functions run unchanged inside ``jax.shard_map``: the batch rows may be sharded over
``batch_axis_name`` and the prototype axis over ``proto_axis_name`` (a mesh axis name, a tuple of names,
or None). Reductions along a sharded axis become ``lax.pmax``/``lax.psum`` collectives over that axis,
and sizes such as the global batch are local sizes times the axis size. With both names None this is
the ordinary single-device computation.

The plain algorithm forms ``exp(s / epsilon)``, which overflows float32 once ``s / epsilon`` exceeds
~88 (for example ``epsilon=0.01`` with cosine scores close to 1). Here the plan is kept as
``log Q = s / epsilon + u_k + v_b`` with per-prototype and per-sample log-potentials ``u``, ``v``, and
every normalisation is a max-shifted log-sum-exp, so any finite input gives finite codes that agree
with the plain algorithm wherever the latter is finite.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from functools import partial

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

AxisName = str | Sequence[str] | None


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


def global_sum(x: jax.Array, axis: int | Sequence[int] | None, axis_name: AxisName = None) -> jax.Array:
    """``jnp.sum(x, axis, keepdims=True)`` where the reduced axes may be sharded over ``axis_name``."""
    s = jnp.sum(x, axis=axis, keepdims=True)
    axis_name = join_axis_names(axis_name)
    return s if axis_name is None else lax.psum(s, axis_name)


def global_max(x: jax.Array, axis: int | Sequence[int] | None, axis_name: AxisName = None) -> jax.Array:
    """``jnp.max(x, axis, keepdims=True)`` over axes sharded on ``axis_name``, as a constant (no gradient)."""
    m = lax.stop_gradient(jnp.max(x, axis=axis, keepdims=True))
    axis_name = join_axis_names(axis_name)
    return m if axis_name is None else lax.pmax(m, axis_name)


def distributed_logsumexp(
    x: jax.Array, axis: int | Sequence[int] | None, axis_name: AxisName = None
) -> jax.Array:
    """Max-shifted ``log(sum(exp(x)))`` over ``axis`` (kept as size-1 dims), sharded over ``axis_name``.

    The shift is the global maximum (``pmax`` of the local maxima); it is treated as a constant, which
    leaves the value and the gradient (a softmax) unchanged. Slices that are entirely ``-inf`` give
    ``-inf`` rather than NaN.
    """
    m = global_max(x, axis, axis_name)
    m = jnp.where(jnp.isfinite(m), m, jnp.zeros_like(m))
    return m + jnp.log(global_sum(jnp.exp(x - m), axis, axis_name))


def distributed_softmax(x: jax.Array, axis: int | Sequence[int], axis_name: AxisName = None) -> jax.Array:
    """Max-shifted softmax over ``axis`` (sharded over ``axis_name``), normalised in the linear domain."""
    e = jnp.exp(x - global_max(x, axis, axis_name))
    return e / global_sum(e, axis, axis_name)


def sinkhorn_knopp(
    scores: jax.Array,
    epsilon: float = 0.05,
    num_iters: int = 3,
    *,
    batch_axis_name: AxisName = None,
    proto_axis_name: AxisName = None,
) -> jax.Array:
    """SwAV's Sinkhorn-Knopp codes for ``scores`` (B, K); float32 (B, K) rows summing to 1, no gradient.

    Semantics are those of SwAV's ``distributed_sinkhorn``::

        Q = exp(scores / epsilon).T;  Q /= sum(Q)
        repeat num_iters:  Q /= Q.sum(1) * K   (per prototype, over the global batch)
                           Q /= Q.sum(0) * B   (per sample)
        return (Q * B).T

    where B counts every row of the global batch (queue rows included, if the caller concatenated
    them) and K every prototype. The computation is done in float32 whatever the input dtype, in the
    log domain (see the module docstring), and under ``stop_gradient``.

    Args:
      scores: local block of the (B, K) score matrix, e.g. cosines between embeddings and prototypes.
      epsilon: entropic regularisation; smaller gives harder codes.
      num_iters: number of (prototype, sample) normalisation rounds; a static Python int.
      batch_axis_name: mesh axis name(s) the rows are sharded over, or None.
      proto_axis_name: mesh axis name(s) the prototype axis is sharded over, or None.
    """
    logits = lax.stop_gradient(scores).astype(jnp.float32) / epsilon
    num_local, k_local = logits.shape
    global_batch = num_local * axis_size(batch_axis_name)
    log_b = math.log(global_batch)
    log_k = math.log(k_local * axis_size(proto_axis_name))

    if num_iters == 0:
        both = join_axis_names(batch_axis_name, proto_axis_name)
        return global_batch * distributed_softmax(logits, (0, 1), both)

    def prototype_step(v: jax.Array) -> jax.Array:
        return -log_k - distributed_logsumexp(logits + v, axis=0, axis_name=batch_axis_name)

    def sample_step(u: jax.Array) -> jax.Array:
        return -log_b - distributed_logsumexp(logits + u, axis=1, axis_name=proto_axis_name)

    # SwAV's initial division by the total mass scales every entry by the same constant, which the
    # first per-prototype normalisation cancels exactly, so the first step starts from the raw kernel.
    u = prototype_step(jnp.zeros((num_local, 1), jnp.float32))
    u = lax.fori_loop(0, num_iters - 1, lambda _, u: prototype_step(sample_step(u)), u)
    # The last per-sample normalisation followed by ``* B`` is a softmax over the prototypes; doing it in
    # the linear domain keeps row sums at 1 to float32 rounding even when the logits are huge.
    return distributed_softmax(logits + u, axis=1, axis_name=proto_axis_name)


def sharded_sinkhorn_knopp(
    scores: jax.Array,
    mesh: Mesh,
    batch_axes: AxisName = ("data", "fsdp"),
    proto_axis: AxisName = None,
    **kwargs,
) -> jax.Array:
    """``sinkhorn_knopp`` on a global (B, K) array, rows sharded over ``batch_axes`` and K over ``proto_axis``.

    The input is placed with ``NamedSharding(mesh, P(batch_axes, proto_axis))`` (a no-op when it already
    is) and the codes come back with the same sharding. ``kwargs`` go to ``sinkhorn_knopp``
    (``epsilon``, ``num_iters``).
    """
    batch_axes = join_axis_names(batch_axes)
    proto_axis = join_axis_names(proto_axis)
    spec = P(batch_axes, proto_axis)
    fn = jax.shard_map(
        partial(sinkhorn_knopp, batch_axis_name=batch_axes, proto_axis_name=proto_axis, **kwargs),
        mesh=mesh,
        in_specs=spec,
        out_specs=spec,
    )
    return fn(jax.device_put(scores, NamedSharding(mesh, spec)))
