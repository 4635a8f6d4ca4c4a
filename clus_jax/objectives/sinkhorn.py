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

Precision. The codes are computed in the scores' dtype with float32 as the floor: bfloat16 or float32
scores give float32 codes, float64 scores (with ``jax_enable_x64``) float64 codes.

Fast path. The log domain needs an ``exp`` over the whole matrix in every normalisation. When the
kernel fits the compute dtype after a per-prototype shift, the same iteration runs on scaling vectors instead:
``E = exp(s / epsilon - c_k)`` with ``c_k`` the prototype's maximum over the batch (a per-prototype
constant, which the first per-prototype normalisation cancels exactly), then every normalisation is a
matrix-vector product (``v @ E`` for the prototypes, ``E @ u`` for the samples) and
``Q = diag(v) E diag(u)``: one ``exp`` in all, and reductions that run as fast GEMVs on every backend.
Every sum is checked against the largest term that the compute dtype could have flushed to zero; if any sum is
too small for that bound to be negligible (or anything is not finite), the log-domain path computes the
codes instead (``lax.cond``, so only one branch runs).
"""
from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from clus_jax.objectives.precision import compute_dtype
from clus_jax.parallel.collectives import (
    AxisName,
    all_max,
    all_min,
    all_sum,
    axis_size,
    distributed_logsumexp,
    distributed_softmax,
    join_axis_names,
)


def sinkhorn_knopp(
    scores: jax.Array,
    epsilon: float = 0.05,
    num_iters: int = 3,
    *,
    batch_axis_name: AxisName = None,
    proto_axis_name: AxisName = None,
    fast: bool = True,
) -> jax.Array:
    """SwAV's Sinkhorn-Knopp codes for ``scores`` (B, K): (B, K) rows summing to 1, no gradient.

    Semantics are those of SwAV's ``distributed_sinkhorn``::

        Q = exp(scores / epsilon).T;  Q /= sum(Q)
        repeat num_iters:  Q /= Q.sum(1) * K   (per prototype, over the global batch)
                           Q /= Q.sum(0) * B   (per sample)
        return (Q * B).T

    where B counts every row of the global batch (queue rows included, if the caller concatenated
    them) and K every prototype. The computation is done in the scores' precision with float32 as the
    floor (float64 scores give float64 codes, bfloat16 scores float32 codes), in the log domain or on
    scaling vectors (see the module docstring), and under ``stop_gradient``.

    Args:
      scores: local block of the (B, K) score matrix, e.g. cosines between embeddings and prototypes.
      epsilon: entropic regularisation; smaller gives harder codes.
      num_iters: number of (prototype, sample) normalisation rounds; a static Python int.
      batch_axis_name: mesh axis name(s) the rows are sharded over, or None.
      proto_axis_name: mesh axis name(s) the prototype axis is sharded over, or None.
      fast: use the scaling-vector path when the compute dtype allows it (see the module docstring);
        False always runs the log-domain iteration. Both give the same codes to rounding.
    """
    scores = lax.stop_gradient(scores).astype(compute_dtype(scores))
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
        u = prototype_step(jnp.zeros((num_local, 1), scores.dtype))
        u = lax.fori_loop(0, num_iters - 1, lambda _, u: prototype_step(sample_step(u)), u)
        # The last per-sample normalisation followed by ``* B`` is a softmax over the prototypes; doing it
        # in the linear domain keeps row sums at 1 to rounding even when the logits are huge.
        return distributed_softmax(logits + u, axis=1, axis_name=proto_axis_name)

    if not fast:
        return log_domain()
    kernel, u, row_sums, ok = _scaling_iterations(scores, epsilon, num_iters, batch_axis_name, proto_axis_name)
    return lax.cond(ok, lambda: kernel * (u[None, :] / row_sums[:, None]), log_domain)


# Largest accepted relative error of a sum from terms flushed to zero, per term count and compute dtype
# (about a millionth of the dtype's epsilon).
_SUM_TOLERANCE = {jnp.dtype(jnp.float32): 1e-13, jnp.dtype(jnp.float64): 1e-22}


def _flush_bounds(dtype: jnp.dtype) -> tuple[float, float]:
    """(bound below which ``dtype`` may flush a term to zero, accepted relative error per flushed term).

    A term below the dtype's smallest normal number may be flushed to zero (XLA enables flush-to-zero on
    CPU, for float64 as for float32).
    """
    return float(jnp.finfo(dtype).tiny), _SUM_TOLERANCE[jnp.dtype(dtype)]


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

    ``E = exp((scores - c) / epsilon)`` with ``c`` the per-prototype maximum over the global batch, in the
    dtype of ``scores``. The codes are ``E * u / row_sums[:, None]``. ``ok`` is False when some sum could
    carry a relative error above ``_SUM_TOLERANCE`` per term from flushed terms, or is not finite.
    """
    num_local, k_local = scores.shape
    global_b = num_local * axis_size(batch_axis_name)
    global_k = k_local * axis_size(proto_axis_name)
    batch_axes, proto_axes = join_axis_names(batch_axis_name), join_axis_names(proto_axis_name)
    shift = all_max(column_max(scores), batch_axes)
    kernel = jnp.exp((scores - shift[None, :]) / epsilon)
    hi = lax.Precision.HIGHEST

    def col_sums(v: jax.Array) -> jax.Array:  # sum_b E_bk v_b over the global batch
        return all_sum(jnp.dot(v, kernel, precision=hi), batch_axes)

    def row_sums(u: jax.Array) -> jax.Array:  # sum_k E_bk u_k over all prototypes
        return all_sum(jnp.dot(kernel, u, precision=hi), proto_axes)

    both = join_axis_names(batch_axis_name, proto_axis_name)
    flush, tolerance = _flush_bounds(scores.dtype)

    def safe(sums: jax.Array, weights: jax.Array, weights_axes, terms: int) -> jax.Array:
        # Each flushed term is below flush * max(1, weight); the sum must dwarf all of them together.
        floor = terms * flush * jnp.maximum(all_max(jnp.max(weights), weights_axes), 1.0) / tolerance
        ok = (jnp.all(sums >= floor) & jnp.all(jnp.isfinite(sums))).astype(jnp.int32)  # NaN fails too
        return all_min(ok, both) > 0

    ones = jnp.ones((num_local,), scores.dtype)
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
