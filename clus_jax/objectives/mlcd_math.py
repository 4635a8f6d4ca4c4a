"""MLCD's loss (Eq. 5) and UNICOM's single-label margin softmax, on given class centres.

Per sample (An et al., ECCV 2024, Eq. 5), with L2-normalised features and centres,

    L = log(1 + sum_{i in P} exp(-s_i)) + log(1 + sum_{j in N} exp(s_j)),
    s_i = scale * cos(theta_i + margin)  (positives),   s_j = scale * cos(theta_j)  (negatives),

averaged over the batch; the margin is ArcFace's, written straight-through as unicom writes it (forward value
with the margin, gradient of the plain cosine). Every function runs on one device or inside ``shard_map`` with
the centres' rows split over ``axis_name`` (``embeddings`` and labels whole), with the same value.
Where the centres come from and which are sampled is ``partial_fc.py``; the objective is ``mlcd.py``.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from clus_jax.objectives.precision import compute_dtype
from clus_jax.parallel.collectives import AxisName, all_sum, global_max, global_sum, shard_offset

#: unicom's floor on the target probability (``loss.clamp_min_(1e-30)``).
PROB_FLOOR = 1e-30


def _unit(x: jax.Array, dtype: jnp.dtype, eps: float = 1e-12) -> jax.Array:
    """``torch.nn.functional.normalize``: x / max(|x|, eps), in ``dtype``.

    As torch's, the norm of a zero row has a zero gradient (``sqrt`` at 0 would give NaN), so a zero row masked
    out of the loss gets a zero gradient; other rows take the norm of ``x`` itself: the same bits both ways.
    """
    x = x.astype(dtype)
    nonzero = jnp.any(x != 0, axis=-1, keepdims=True)
    norm = jnp.linalg.norm(jnp.where(nonzero, x, jnp.ones((), dtype)), axis=-1, keepdims=True)
    return x / jnp.maximum(jnp.where(nonzero, norm, jnp.zeros((), dtype)), eps)


def _straight_through(x: jax.Array, value: jax.Array) -> jax.Array:
    """``value`` forward, the gradient of ``x`` backward (unicom's margin written under ``no_grad``)."""
    return x + lax.stop_gradient(value - x)


def _arc_margin(cos: jax.Array, margin: float) -> jax.Array:
    """ArcFace ``cos(arccos(c) + m)`` forward with the gradient of ``c`` (straight-through)."""
    if not margin:
        return cos
    return _straight_through(cos, jnp.cos(jnp.arccos(lax.stop_gradient(cos)) + margin))


def _log1p_sum_exp(x: jax.Array, axis: int, axis_name: AxisName) -> jax.Array:
    """``log(1 + sum(exp(x)))`` over ``axis`` (sharded over ``axis_name``), stable, -inf entries allowed.

    The shift is max(0, global max), a constant for the gradient; the 1 keeps the sum >= 1, so rows whose
    entries are all -inf give 0 with a zero (not NaN) gradient.
    """
    m = jnp.maximum(global_max(x, axis, axis_name), 0.0)
    total = jnp.exp(-m) + global_sum(jnp.exp(x - m), axis, axis_name)
    return jnp.squeeze(m + jnp.log(total), axis)


def local_labels(labels: jax.Array, num_local: int, axis_name: AxisName) -> tuple[jax.Array, jax.Array]:
    """(row of this shard's centres, whether this shard owns the label): labels < 0 or elsewhere are not owned."""
    local = labels - shard_offset(num_local, axis_name)
    owned = (labels >= 0) & (local >= 0) & (local < num_local)
    return jnp.where(owned, local, 0), owned


def margin_softmax_loss(
    embeddings: jax.Array, labels: jax.Array, centers: jax.Array, *, scale: float = 32.0, arc_margin: float = 0.3,
    cos_margin: float = 0.0, axis_name: AxisName = None,
) -> jax.Array:
    """UNICOM's loss: ``PartialFC_V2(CombinedMarginLoss(s, 1, arc_margin, cos_margin))`` on given centres.

    Cosines of the L2-normalised ``embeddings [B, D]`` and ``centers [C, D]`` (both raw), clamped to
    [-1, 1]; on the target column only, ArcFace ``cos(arccos(c) + arc_margin)`` (when ``cos_margin`` is 0)
    or CosFace ``c - cos_margin``, the ArcFace margin straight-through as unicom writes it; times ``scale``;
    softmax cross-entropy with the target probability clamped at >= 1e-30 (the gradient stays
    ``softmax - onehot``, as unicom's custom backward); batch mean. ``labels [B]`` index rows of
    ``centers``: a caller that sampled centres passes the sampled rows and the remapped labels.

    ``axis_name``: inside ``shard_map`` with the rows of ``centers`` split over it (and ``embeddings``,
    ``labels`` whole on every shard) each device scores its own centres and the result equals the
    single-device value.
    """
    if arc_margin and cos_margin:
        raise ValueError("margin_softmax_loss: unicom's CombinedMarginLoss applies arc_margin (ArcFace) or "
                         f"cos_margin (CosFace), not both; got {arc_margin} and {cos_margin}")
    dtype = compute_dtype(embeddings, centers)
    cos = jnp.clip(jnp.einsum("bd,cd->bc", _unit(embeddings, dtype), _unit(centers, dtype),
                              preferred_element_type=dtype), -1.0, 1.0)
    local, owned = local_labels(labels, centers.shape[0], axis_name)
    target = owned[:, None] & (jnp.arange(centers.shape[0])[None, :] == local[:, None])
    margined = cos - cos_margin if cos_margin else _arc_margin(cos, arc_margin)
    logits = scale * jnp.where(target, margined, cos)
    lse = jnp.squeeze(global_max(logits, 1, axis_name), 1)
    lse = lse + jnp.log(jnp.squeeze(global_sum(jnp.exp(logits - lse[:, None]), 1, axis_name), 1))
    nll = lse - all_sum(jnp.sum(jnp.where(target, logits, 0.0), axis=1), axis_name)
    clamped = _straight_through(nll, jnp.minimum(nll, -np.log(PROB_FLOOR)))
    return jnp.mean(clamped)


def mlcd_terms(
    embeddings: jax.Array, positive_labels: jax.Array, centers: jax.Array, candidates: jax.Array | None,
    negative_mask: jax.Array | None, *, scale: float, margin: float, axis_name: AxisName,
) -> dict[str, jax.Array]:
    """Per-row positive and negative terms of Eq. 5 and diagnostics, on this shard's centres.

    ``embeddings [B, D]`` and ``positive_labels [B, l]`` (global class ids) are whole; ``centers [k, D]``
    are this shard's rows; ``candidates [S]`` (sorted local rows) restricts the negatives to a sample,
    ``negative_mask`` ([k] or [B, k] over this shard's rows, or [S]/[B, S] over the candidates) further.
    Returns 'positive', 'negative' ([B], the same on every shard) and this shard's partial sums
    'positive_cos_sum', 'positive_count', 'negative_cos_sum', 'negative_count', 'classes_hit'.
    """
    dtype = compute_dtype(embeddings, centers)
    e = _unit(embeddings, dtype)
    num_local = centers.shape[0]
    local, owned = local_labels(positive_labels, num_local, axis_name)

    # Positives: each on the one shard that owns it (s_i = scale * cos(theta_i + margin)).
    cos_pos = jnp.clip(jnp.einsum("bd,bld->bl", e, _unit(centers[local], dtype), preferred_element_type=dtype),
                       -1.0, 1.0)
    positive = _log1p_sum_exp(jnp.where(owned, -scale * _arc_margin(cos_pos, margin), -jnp.inf), 1, axis_name)

    # Negatives: the candidates (all local rows, or the sampled ones) other than the row's own positives.
    rows = centers if candidates is None else centers[candidates]
    cos_neg = jnp.clip(jnp.einsum("bd,sd->bs", e, _unit(rows, dtype), preferred_element_type=dtype), -1.0, 1.0)
    if candidates is None:
        column, in_set = local, owned
    else:
        column = jnp.clip(jnp.searchsorted(candidates, local), 0, candidates.shape[0] - 1)
        in_set = owned & (candidates[column] == local)
    batch = jnp.arange(e.shape[0])[:, None]
    valid = jnp.ones(cos_neg.shape, jnp.bool_).at[batch, jnp.where(in_set, column, rows.shape[0])].set(
        False, mode="drop")
    if negative_mask is not None:
        valid = valid & jnp.broadcast_to(negative_mask, valid.shape)
    negative = _log1p_sum_exp(jnp.where(valid, scale * cos_neg, -jnp.inf), 1, axis_name)

    hit = jnp.zeros((num_local,), jnp.bool_).at[jnp.where(owned, local, num_local)].set(True, mode="drop")
    f32 = lambda x: lax.stop_gradient(x).astype(jnp.float32)  # noqa: E731
    return {
        "positive": positive, "negative": negative,
        "positive_cos_sum": f32(jnp.sum(jnp.where(owned, cos_pos, 0.0))), "positive_count": f32(jnp.sum(owned)),
        "negative_cos_sum": f32(jnp.sum(jnp.where(valid, cos_neg, 0.0))), "negative_count": f32(jnp.sum(valid)),
        "classes_hit": f32(jnp.sum(hit)),
    }


def mlcd_loss(
    embeddings: jax.Array, positive_labels: jax.Array, centers: jax.Array, *, scale: float = 32.0,
    margin: float = 0.3, negative_mask: jax.Array | None = None, axis_name: AxisName = None,
) -> jax.Array:
    """The MLCD loss (Eq. 5), batch mean of ``log(1 + sum_P exp(-s_i)) + log(1 + sum_N exp(s_j))``.

    ``embeddings [B, D]`` and ``centers [K, D]`` arrive raw (both are L2-normalised here);
    ``positive_labels [B, l]`` are class ids, entries -1 ignored (a row's entries are distinct).
    ``s_i = scale * cos(theta_i + margin)`` on the positives (straight-through, as unicom's margin) and
    ``s_j = scale * cos(theta_j)`` on the negatives: every centre that is not a positive of the row, or only
    those where ``negative_mask`` ([K] or [B, K] bool) is True. Stable at any scale (log-sum-exp).

    ``axis_name``: inside ``shard_map`` with the rows of ``centers`` (and the last axis of ``negative_mask``)
    split over it, ``embeddings`` and ``positive_labels`` whole, the result equals the single-device value.
    """
    terms = mlcd_terms(embeddings, positive_labels, centers, None, negative_mask, scale=scale, margin=margin,
                        axis_name=axis_name)
    return jnp.mean(terms["positive"] + terms["negative"])
