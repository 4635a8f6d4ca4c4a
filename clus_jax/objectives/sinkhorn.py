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

Fast path. The log domain needs an ``exp`` over the whole matrix in every normalisation. When the
kernel fits float32 after a per-prototype shift, the same iteration runs on scaling vectors instead:
``E = exp(s / epsilon - c_k)`` with ``c_k`` the prototype's maximum over the batch (a per-prototype
constant, which the first per-prototype normalisation cancels exactly), then every normalisation is a
matrix-vector product (``v @ E`` for the prototypes, ``E @ u`` for the samples) and
``Q = diag(v) E diag(u)``: one ``exp`` in all, and reductions that run as fast GEMVs on every backend.
Every sum is checked against the largest term that float32 could have flushed to zero; if any sum is
too small for that bound to be negligible (or anything is not finite), the log-domain path computes the
codes instead (``lax.cond``, so only one branch runs).
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
    fast: bool = True,
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
      fast: use the scaling-vector path when float32 allows it (see the module docstring); False always
        runs the log-domain iteration. Both give the same codes to float32 rounding.
    """
    scores = lax.stop_gradient(scores).astype(jnp.float32)
    num_local, k_local = scores.shape
    global_batch = num_local * axis_size(batch_axis_name)
    log_b = math.log(global_batch)
    log_k = math.log(k_local * axis_size(proto_axis_name))

    if num_iters == 0:
        both = join_axis_names(batch_axis_name, proto_axis_name)
        return global_batch * distributed_softmax(scores / epsilon, (0, 1), both)

    def log_domain() -> jax.Array:
        logits = scores / epsilon

        def prototype_step(v: jax.Array) -> jax.Array:
            return -log_k - distributed_logsumexp(logits + v, axis=0, axis_name=batch_axis_name)

        def sample_step(u: jax.Array) -> jax.Array:
            return -log_b - distributed_logsumexp(logits + u, axis=1, axis_name=proto_axis_name)

        # SwAV's initial division by the total mass scales every entry by the same constant, which the
        # first per-prototype normalisation cancels exactly, so the first step starts from the raw kernel.
        u = prototype_step(jnp.zeros((num_local, 1), jnp.float32))
        u = lax.fori_loop(0, num_iters - 1, lambda _, u: prototype_step(sample_step(u)), u)
        # The last per-sample normalisation followed by ``* B`` is a softmax over the prototypes; doing it
        # in the linear domain keeps row sums at 1 to float32 rounding even when the logits are huge.
        return distributed_softmax(logits + u, axis=1, axis_name=proto_axis_name)

    if not fast:
        return log_domain()
    kernel, u, row_sums, ok = _scaling_iterations(scores, epsilon, num_iters, batch_axis_name, proto_axis_name)
    return lax.cond(ok, lambda: kernel * (u[None, :] / row_sums[:, None]), log_domain)


# A float32 term below this is flushed to zero (XLA enables flush-to-zero on CPU).
_FLUSH = float(jnp.finfo(jnp.float32).tiny)
# Largest accepted relative error of a sum from terms flushed to zero, per term count.
_SUM_TOLERANCE = 1e-13


def column_max(x: jax.Array, rows_per_step: int = 32) -> jax.Array:
    """``max(x, axis=0)`` of a 2-D array; on CPU as a loop of contiguous row maxima.

    XLA:CPU reduces over the leading axis of a wide row-major matrix one strided column at a time, more
    than an order of magnitude slower than a row reduction. Here a loop takes ``rows_per_step`` rows at a
    time and folds them into a running [K] maximum with elementwise maxima, which reads every element
    once, contiguously, and allocates nothing of the matrix's size.
    """
    n = x.shape[0]
    if jax.default_backend() != "cpu" or n <= rows_per_step:
        return jnp.max(x, axis=0)
    steps = n // rows_per_step
    blocks = x[: steps * rows_per_step].reshape(steps, rows_per_step, x.shape[1])

    def body(i, acc):
        block = lax.dynamic_index_in_dim(blocks, i, 0, keepdims=False)
        for j in range(rows_per_step):
            acc = jnp.maximum(acc, block[j])
        return acc

    acc = lax.fori_loop(1, steps, body, jnp.max(blocks[0], axis=0))
    if steps * rows_per_step < n:
        acc = jnp.maximum(acc, jnp.max(x[steps * rows_per_step:], axis=0))
    return acc


def _scaling_iterations(
    scores: jax.Array, epsilon: float, num_iters: int, batch_axis_name: AxisName, proto_axis_name: AxisName
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Sinkhorn on scaling vectors: (kernel E, prototype scaling u, last row sums E @ u, all sums safe).

    ``E = exp((scores - c) / epsilon)`` with ``c`` the per-prototype maximum over the global batch. The
    codes are ``E * u / row_sums[:, None]``. ``ok`` is False when some sum could carry a relative error
    above ``_SUM_TOLERANCE`` per term from flushed terms, or is not finite.
    """
    num_local, k_local = scores.shape
    global_b = num_local * axis_size(batch_axis_name)
    global_k = k_local * axis_size(proto_axis_name)
    shift = column_max(scores)
    batch_axes, proto_axes = join_axis_names(batch_axis_name), join_axis_names(proto_axis_name)
    if batch_axes is not None:
        shift = lax.pmax(shift, batch_axes)
    kernel = jnp.exp((scores - shift[None, :]) / epsilon)
    hi = lax.Precision.HIGHEST

    def col_sums(v: jax.Array) -> jax.Array:  # sum_b E_bk v_b over the global batch
        s = jnp.dot(v, kernel, precision=hi)
        return s if batch_axes is None else lax.psum(s, batch_axes)

    def row_sums(u: jax.Array) -> jax.Array:  # sum_k E_bk u_k over all prototypes
        r = jnp.dot(kernel, u, precision=hi)
        return r if proto_axes is None else lax.psum(r, proto_axes)

    def gmax(x: jax.Array, axes) -> jax.Array:
        m = jnp.max(x)
        return m if axes is None else lax.pmax(m, axes)

    both = join_axis_names(batch_axis_name, proto_axis_name)

    def safe(sums: jax.Array, weights: jax.Array, weights_axes, terms: int) -> jax.Array:
        # Each flushed term is below _FLUSH * max(1, weight); the sum must dwarf all of them together.
        floor = terms * _FLUSH * jnp.maximum(gmax(weights, weights_axes), 1.0) / _SUM_TOLERANCE
        ok = (jnp.all(sums >= floor) & jnp.all(jnp.isfinite(sums))).astype(jnp.int32)  # NaN fails too
        return (ok if both is None else lax.pmin(ok, both)) > 0

    ones = jnp.ones((num_local,), jnp.float32)
    s = col_sums(ones)
    ok = safe(s, ones, batch_axes, global_b)
    u = 1.0 / (global_k * s)

    def body(_, carry):
        u, ok = carry
        r = row_sums(u)
        ok &= safe(r, u, proto_axes, global_k)
        v = 1.0 / (global_b * r)
        s = col_sums(v)
        ok &= safe(s, v, batch_axes, global_b)
        return 1.0 / (global_k * s), ok

    u, ok = lax.fori_loop(0, num_iters - 1, body, (u, ok))
    r = row_sums(u)
    ok &= safe(r, u, proto_axes, global_k)
    return kernel, u, r, ok


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
