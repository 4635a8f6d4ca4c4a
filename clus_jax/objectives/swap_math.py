"""Swapped-prediction loss between two views (SwAV; image and text in Clus).

Each view's prototype scores are turned into equipartitioned codes by Sinkhorn-Knopp, and each view is
trained to predict the *other* view's codes through a temperature softmax over the prototypes:

    L = 1/2 [ CE(q_a, softmax(s_b / tau)) + CE(q_b, softmax(s_a / tau)) ],
    CE(q, p) = mean over the global batch of  -sum_k q_k log p_k.

Codes are targets only: gradients reach the scores through the log-softmax and never through the codes.
Like ``sinkhorn``, every function runs inside ``jax.shard_map`` with rows sharded over
``batch_axis_name`` and prototypes over ``proto_axis_name``; the returned scalars are the global values,
identical on every shard. The math runs in the scores' precision with float32 as the floor (see
``clus_jax.objectives.precision``).
"""
from __future__ import annotations

import jax
from jax import lax

from clus_jax.objectives.precision import compute_dtype
from clus_jax.objectives.sinkhorn import sinkhorn_knopp
from clus_jax.parallel.collectives import AxisName, axis_size, distributed_logsumexp, global_sum


def log_softmax(logits: jax.Array, *, proto_axis_name: AxisName = None) -> jax.Array:
    """``log_softmax`` over the last (prototype) axis, which may be sharded over ``proto_axis_name``."""
    return logits - distributed_logsumexp(logits, axis=-1, axis_name=proto_axis_name)


def cross_entropy_with_codes(
    codes: jax.Array,
    scores: jax.Array,
    temperature: float = 0.1,
    *,
    batch_axis_name: AxisName = None,
    proto_axis_name: AxisName = None,
) -> jax.Array:
    """Global-batch mean of ``-sum_k codes * log_softmax(scores / temperature)``, at least in float32.

    ``codes`` (B, K) are constant targets (stop-gradient); ``scores`` (B, K) receive the gradient.
    """
    dtype = compute_dtype(codes, scores)
    logits = scores.astype(dtype) / temperature
    log_p = log_softmax(logits, proto_axis_name=proto_axis_name)
    targets = lax.stop_gradient(codes).astype(dtype)
    per_sample = global_sum(targets * log_p, -1, proto_axis_name)
    total = global_sum(per_sample, None, batch_axis_name)
    return -total.reshape(()) / (scores.shape[0] * axis_size(batch_axis_name))


def swapped_prediction_loss(
    scores_a: jax.Array,
    scores_b: jax.Array,
    temperature: float = 0.1,
    epsilon: float = 0.05,
    num_iters: int = 3,
    *,
    batch_axis_name: AxisName = None,
    proto_axis_name: AxisName = None,
    codes_a: jax.Array | None = None,
    codes_b: jax.Array | None = None,
) -> jax.Array:
    """Two-view swapped prediction: ``(CE(q_a, s_b) + CE(q_b, s_a)) / 2`` over the global batch.

    Args:
      scores_a, scores_b: (B, K) prototype scores of the two views (rows are paired samples).
      temperature: softmax temperature of the predictions.
      epsilon, num_iters: Sinkhorn-Knopp settings for the codes.
      batch_axis_name, proto_axis_name: mesh axes the rows / prototypes are sharded over, or None.
      codes_a, codes_b: precomputed (B, K) codes (for example from a teacher, or computed with queue rows
        and then sliced to the current batch); computed from the matching scores when None.
    """
    axes = dict(batch_axis_name=batch_axis_name, proto_axis_name=proto_axis_name)
    if codes_a is None:
        codes_a = sinkhorn_knopp(scores_a, epsilon, num_iters, **axes)
    if codes_b is None:
        codes_b = sinkhorn_knopp(scores_b, epsilon, num_iters, **axes)
    loss_a = cross_entropy_with_codes(codes_a, scores_b, temperature, **axes)
    loss_b = cross_entropy_with_codes(codes_b, scores_a, temperature, **axes)
    return 0.5 * (loss_a + loss_b)
