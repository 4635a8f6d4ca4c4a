"""MLCD (An, Yang, Dai, Feng, Deng, ECCV 2024): multi-label cluster discrimination over sharded class centres.

``config.objectives = {'mlcd': 1.0}``: image-only batches with a ``cluster_labels [l]`` field (the l nearest
k-means centres of each image, -1 = padding), a K-way normalised classifier owned by the objective
(``params['mlcd']['centers']``), and per sample (paper Eq. 5)

    L = log(1 + sum_{i in P} exp(-s_i)) + log(1 + sum_{j in N} exp(s_j)),
    s_i = scale * cos(theta_i + margin)  (positives),   s_j = scale * cos(theta_j)  (sampled negatives),

averaged over the batch. The pure functions are public: ``mlcd_loss``, UNICOM's single-label
``margin_softmax_loss`` and the Partial-FC sampler ``sample_negatives``.

What follows a source:
  * Eq. 5, l = 8 positives, negative sampling rate r = 0.1, margin 0.3 on the positives only, L2-normalised
    features and centres (the paper, main text and appendix A.1.2);
  * everything of ``margin_softmax_loss`` and of the sharding is deepglint/unicom ``unicom/partial_fc.py``
    (``PartialFC_V2``, ``CombinedMarginLoss``, ``DistCrossEntropyFunc``): centres split over all devices
    (``num_local = K / world``), initialised N(0, 0.01) and normalised in the forward pass (not rewritten),
    embeddings all-gathered with gradient, cosines clamped to [-1, 1], the margin written under
    ``torch.no_grad`` (so the forward value has the margin and the gradient is the plain cosine's: a
    straight-through margin), per-shard sampling that keeps every positive of the batch
    (``perm[positive] = 2.0; topk(perm, num_sample)``, sorted, ``num_sample = int(r * num_local)``), and a
    learning rate of 5x the base for the centres (``lr_pfc_weight``).
What is a choice (the MLCD loss itself was never released, deepglint/unicom#84):
  * scale 32 (unicom's ``--margin_loss_s``; the paper gives none) and the ArcFace form ``cos(theta + m)``
    for the paper's "margin for the positive classes", with unicom's straight-through gradient;
  * the sampled set is the Partial-FC one: per shard, the batch's positives plus random negatives, so other
    samples' positives are negatives of a sample; a sample's own positives are never its negatives. The
    positive term is computed from the positive centres directly, so it is exact even when a shard's
    distinct positives exceed its ``num_sample`` (where unicom falls back to a dynamic shape);
  * centres from a k-means file (``init_centers``) start as unit rows; random centres as unicom's.

Sharding: the centres parameter has K rounded up to a multiple of ``pad_classes_to`` (256) rows, so that
K = 1,000,000 splits evenly over 8, 64 or 256 devices (unicom gives shards uneven sizes instead); padding
rows are never sampled, scored or labelled. The class axis follows the 'classes' logical rule (data x fsdp x
tensor: every device), the loss
runs in one shard_map island where each device all-gathers the embeddings and labels, samples its own
centres and computes [B_global, int(r * K / n)] logits; the positive term is summed over shards (each
positive lives on one) and the negative term is a distributed log-sum-exp, so no device holds [B, K].
"""
from __future__ import annotations

import numbers
import os
from functools import partial
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax import lax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from clus_jax.data.fields import IMAGE, FieldSpec
from clus_jax.objectives import registry
from clus_jax.objectives.precision import compute_dtype
from clus_jax.parallel import partitioning
from clus_jax.parallel.collectives import (
    AxisName, all_gather_rows, all_sum, global_max, global_sum, join_axis_names, shard_map_island,
    shard_offset,
)

PyTree = Any

#: Where the centres live (``params['mlcd']['centers']``), their logical axes and their parameter-path regex.
PARAMS_KEY = "mlcd"
CENTERS = "centers"
PARAM_PATTERN = r"^mlcd/"
LOGICAL_AXES = ("classes", "proj")
#: The batch field of positive labels, [l] int32 per example, -1 = padding.
LABELS_FIELD = "cluster_labels"
#: unicom's floor on the target probability (``loss.clamp_min_(1e-30)``).
PROB_FLOOR = 1e-30
#: unicom's random centres: N(0, 0.01).
INIT_STDDEV = 0.01
#: File names read from a clustering output directory, in this order.
CENTERS_FILES = ("centers.npy", "centroids.npy")


# ----------------------------------------------------------------------------------------------------
# Pieces shared by the losses.
# ----------------------------------------------------------------------------------------------------


def _unit(x: jax.Array, dtype: jnp.dtype, eps: float = 1e-12) -> jax.Array:
    """``torch.nn.functional.normalize``: x / max(|x|, eps), in ``dtype``."""
    x = x.astype(dtype)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


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


def _local_labels(labels: jax.Array, num_local: int, axis_name: AxisName) -> tuple[jax.Array, jax.Array]:
    """(row of this shard's centres, whether this shard owns the label): labels < 0 or elsewhere are not owned."""
    local = labels - shard_offset(num_local, axis_name)
    owned = (labels >= 0) & (local >= 0) & (local < num_local)
    return jnp.where(owned, local, 0), owned


# ----------------------------------------------------------------------------------------------------
# UNICOM's single-label margin softmax (PartialFC_V2 + CombinedMarginLoss + DistCrossEntropy).
# ----------------------------------------------------------------------------------------------------


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
    local, owned = _local_labels(labels, centers.shape[0], axis_name)
    target = owned[:, None] & (jnp.arange(centers.shape[0])[None, :] == local[:, None])
    margined = cos - cos_margin if cos_margin else _arc_margin(cos, arc_margin)
    logits = scale * jnp.where(target, margined, cos)
    lse = jnp.squeeze(global_max(logits, 1, axis_name), 1)
    lse = lse + jnp.log(jnp.squeeze(global_sum(jnp.exp(logits - lse[:, None]), 1, axis_name), 1))
    nll = lse - all_sum(jnp.sum(jnp.where(target, logits, 0.0), axis=1), axis_name)
    clamped = _straight_through(nll, jnp.minimum(nll, -np.log(PROB_FLOOR)))
    return jnp.mean(clamped)


# ----------------------------------------------------------------------------------------------------
# MLCD (Eq. 5) and Partial-FC sampling.
# ----------------------------------------------------------------------------------------------------


def sample_negatives(rng: jax.Array, positive_labels: jax.Array, num_classes: int, num_sample: int, *,
                     valid: jax.Array | None = None) -> jax.Array:
    """Partial-FC sampling with static shapes: sorted int32 indices [num_sample] of ``num_classes`` centres.

    Every class in ``positive_labels`` (any shape; entries < 0 or >= ``num_classes`` are ignored, so a
    shard passes its local labels) is kept, and random other classes fill the rest, as unicom's
    ``perm = rand(num_local); perm[positive] = 2.0; topk(perm, num_sample).sort()``. When there are more
    distinct positives than ``num_sample``, a random ``num_sample`` of them are returned. ``valid``
    ([num_classes] bool) marks the rows that may be drawn (padding rows are drawn only when nothing else is
    left; the caller masks them).
    """
    if not 0 < num_sample <= num_classes:
        raise ValueError(f"sample_negatives: num_sample={num_sample} must be in [1, num_classes={num_classes}]")
    labels = jnp.ravel(positive_labels)
    positive = (labels >= 0) & (labels < num_classes)
    priority = jax.random.uniform(rng, (num_classes,), jnp.float32)
    if valid is not None:
        priority = jnp.where(valid, priority, -1.0)
    index = jnp.where(positive, labels, num_classes)
    # Positives rank above every other class, in a random order among themselves (a repeat sets the same value).
    priority = priority.at[index].set(2.0 + priority[jnp.where(positive, labels, 0)], mode="drop")
    _, index = lax.top_k(priority, num_sample)
    return jnp.sort(index.astype(jnp.int32))


def _mlcd_terms(
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
    local, owned = _local_labels(positive_labels, num_local, axis_name)

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
    terms = _mlcd_terms(embeddings, positive_labels, centers, None, negative_mask, scale=scale, margin=margin,
                        axis_name=axis_name)
    return jnp.mean(terms["positive"] + terms["negative"])


def samples_per_shard(num_local: int, sample_rate: float) -> int:
    """unicom's ``num_sample = int(sample_rate * num_local)``, at least 1."""
    return max(1, min(num_local, int(sample_rate * num_local)))


def shard_rng(rng: jax.Array, shard: jax.Array | int) -> jax.Array:
    """The sampling key of centre shard ``shard``: every shard draws its own negatives."""
    return jax.random.fold_in(rng, shard)


def padded_rows(num_classes: int, multiple: int) -> int:
    """Rows of the centres parameter: K rounded up to a multiple of ``multiple``, so K = 1,000,000 splits
    evenly over 8, 64 or 256 devices (1,000,192 rows at 256); the padding rows are never scored."""
    return -(-int(num_classes) // int(multiple)) * int(multiple)


def sampled_classes(rng: jax.Array, positive_labels: jax.Array, num_classes: int, num_shards: int,
                    sample_rate: float, num_rows: int | None = None) -> jax.Array:
    """Global ids of the centres the ``mlcd`` objective samples when its ``num_rows`` (default K) centre rows
    are split in ``num_shards`` shards; ids >= K are padding rows (drawn only by a shard with too few others).

    The same draw the sharded step makes (``shard_rng``, ``sample_negatives`` per shard), on one device:
    feed ``negative_mask`` of ``mlcd_loss`` with it to compute the sharded step's loss unsharded.
    """
    num_local = (num_rows or num_classes) // num_shards
    num_sample = samples_per_shard(num_local, sample_rate)
    out = []
    for s in range(num_shards):
        local = positive_labels - s * num_local
        local = jnp.where((positive_labels >= 0) & (local >= 0) & (local < num_local), local, -1)
        valid = s * num_local + jnp.arange(num_local) < num_classes
        index = (sample_negatives(shard_rng(rng, s), local, num_local, num_sample, valid=valid)
                 if num_sample < num_local else jnp.arange(num_local, dtype=jnp.int32))
        out.append(index + s * num_local)
    return jnp.concatenate(out)


def _partial_fc(embeddings: jax.Array, positive_labels: jax.Array, centers: jax.Array, rng: jax.Array, *,
                num_classes: int, sample_rate: float, scale: float, margin: float, batch_axis_name: AxisName,
                class_axis_name: AxisName) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The objective's loss on local blocks: rows split over the batch axes, centres over the class axes.

    ``centers`` holds this shard's rows of the (padded) parameter; rows with a global id >= ``num_classes``
    are padding, never sampled or scored.
    """
    e = all_gather_rows(embeddings, batch_axis_name)
    labels = all_gather_rows(positive_labels, batch_axis_name)
    num_local = centers.shape[0]
    num_sample = samples_per_shard(num_local, sample_rate)
    real = shard_offset(num_local, class_axis_name) + jnp.arange(num_local) < num_classes
    candidates, mask = None, real
    if num_sample < num_local:
        shard = lax.axis_index(class_axis_name) if join_axis_names(class_axis_name) else 0
        local, owned = _local_labels(labels, num_local, class_axis_name)
        candidates = sample_negatives(shard_rng(rng, shard), jnp.where(owned, local, -1), num_local, num_sample,
                                      valid=real)
        mask = real[candidates]
    terms = _mlcd_terms(e, labels, centers, candidates, mask, scale=scale, margin=margin, axis_name=class_axis_name)
    total = lambda k: all_sum(terms[k], class_axis_name)  # noqa: E731  (each shard's partial sum)
    metrics = {
        "positive_term": jnp.mean(terms["positive"]), "negative_term": jnp.mean(terms["negative"]),
        "positive_cosine": total("positive_cos_sum") / jnp.maximum(total("positive_count"), 1.0),
        "negative_cosine": total("negative_cos_sum") / jnp.maximum(total("negative_count"), 1.0),
        "labels_per_row": total("positive_count") / e.shape[0],
        "classes_hit_fraction": total("classes_hit") / num_classes,
    }
    loss = jnp.mean(terms["positive"] + terms["negative"])
    # The same value on every device; a mean over batch axes the centres are not split over makes that explicit.
    rest = tuple(a for a in _as_tuple(batch_axis_name) if a not in _as_tuple(class_axis_name))
    if rest:
        loss, metrics = jax.tree.map(lambda x: lax.pmean(x, rest), (loss, metrics))
    return loss, metrics


def _as_tuple(axes: AxisName) -> tuple[str, ...]:
    axes = join_axis_names(axes)
    return () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)


# ----------------------------------------------------------------------------------------------------
# The objective.
# ----------------------------------------------------------------------------------------------------


def class_axes(num_classes: int, config: ml_collections.ConfigDict, mesh: Mesh) -> AxisName:
    """Mesh axes the K centres are split over: the 'classes' logical rule, as the parameter is placed."""
    rules = [tuple(r) for r in config.logical_axis_rules]
    spec = partitioning.logical_to_spec(LOGICAL_AXES, (num_classes, int(config.model.embed_dim)), rules, mesh)
    return join_axis_names(spec[0] if len(spec) else None)


def centers_file(path: str) -> str:
    """The .npy of a ``config.mlcd.init_centers`` path: the file itself or a clustering output directory's."""
    if os.path.isdir(path):
        for name in CENTERS_FILES:
            if os.path.isfile(os.path.join(path, name)):
                return os.path.join(path, name)
        raise FileNotFoundError(f"directory {path!r} holds none of {list(CENTERS_FILES)}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path!r} does not exist")
    return path


def load_centers(path: str) -> np.ndarray:
    """k-means centres [K, D] from ``path`` as float32 unit rows (the classifier starts on the sphere)."""
    x = np.asarray(np.load(centers_file(path)), np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def init_centers(rng: jax.Array, num_rows: int, dim: int, path: str = "") -> nn.LogicallyPartitioned:
    """[rows, D] centres boxed with the class logical axes: unicom's N(0, 0.01), or the unit rows of the
    [K, D] file at ``path`` followed by zero padding rows.

    The file is read on the host when the initial state is built (``jax.pure_callback``), never while tracing.
    """
    shape = jax.ShapeDtypeStruct((num_rows, dim), jnp.float32)
    if path:
        def load() -> np.ndarray:
            rows = load_centers(path)
            return np.concatenate([rows, np.zeros((num_rows - len(rows), dim), np.float32)])

        value = jax.pure_callback(load, shape)
    else:
        value = INIT_STDDEV * jax.random.normal(rng, shape.shape, jnp.float32)
    return nn.LogicallyPartitioned(value, LOGICAL_AXES)


def _check(config: ml_collections.ConfigDict, key: str, ok, requirement: str, *, integer: bool = False) -> None:
    value = config.mlcd[key]
    kind = numbers.Integral if integer else numbers.Real
    if isinstance(value, bool) or not isinstance(value, kind) or not ok(value):
        raise registry.ConfigError(f"config.mlcd.{key}={value!r} must be {requirement}")


@registry.register
class MLCD(registry.Objective):
    """Multi-label cluster discrimination against K sharded class centres with Partial-FC sampling."""

    name = "mlcd"
    defaults = {
        "num_classes": 1_000_000,  # K, the number of k-means centres (paper: 1M on LAION-400M)
        "num_labels": 8,  # l, positives per image: the batch field cluster_labels [l] (paper: 8)
        "sample_rate": 0.1,  # r, fraction of each shard's centres scored per step (paper: 0.1)
        "scale": 32.0,  # s of the cosine logits (unicom's default; the paper gives none)
        "margin": 0.3,  # additive angular margin on the positives (paper: 0.3)
        "lr_mult": 5.0,  # learning-rate multiplier of the centres (unicom: lr_pfc_weight 5)
        "init_centers": "",  # .npy [K, D] or a clustering output directory; '' = random (unicom's N(0, 0.01))
        "pad_classes_to": 256,  # the centres have K rounded up to a multiple of this many rows (even shards)
    }

    def validate(self, config: ml_collections.ConfigDict) -> None:
        _check(config, "num_classes", lambda v: v > 0, "a positive integer", integer=True)
        k = int(config.mlcd.num_classes)
        _check(config, "num_labels", lambda v: 1 <= v <= k, f"an integer in [1, config.mlcd.num_classes={k}]",
               integer=True)
        _check(config, "sample_rate", lambda v: 0 < v <= 1, "in (0, 1]")
        _check(config, "scale", lambda v: v > 0, "> 0")
        _check(config, "margin", lambda v: 0 <= v < np.pi, "in [0, pi)")
        _check(config, "lr_mult", lambda v: v >= 0, ">= 0")
        _check(config, "pad_classes_to", lambda v: v >= 1, "a positive integer", integer=True)
        path = config.mlcd.init_centers
        if not isinstance(path, str):
            raise registry.ConfigError(f"config.mlcd.init_centers={path!r} must be a path or ''")
        if path:
            try:
                shape = np.load(centers_file(path), mmap_mode="r").shape
            except (OSError, ValueError) as e:
                raise registry.ConfigError(f"config.mlcd.init_centers={path!r}: {e}") from None
            want = (k, int(config.model.embed_dim))
            if tuple(shape) != want:
                raise registry.ConfigError(
                    f"config.mlcd.init_centers={path!r} holds centres of shape {tuple(shape)}, but "
                    f"config.mlcd.num_classes x config.model.embed_dim is {want}")

    def modalities(self, config: ml_collections.ConfigDict) -> tuple[str, ...]:
        return (IMAGE,)

    def batch_fields(self, config: ml_collections.ConfigDict) -> dict[str, FieldSpec]:
        return {LABELS_FIELD: FieldSpec((int(config.mlcd.num_labels),), "int32")}

    def init_params(self, rng: jax.Array, config: ml_collections.ConfigDict) -> PyTree:
        rows = padded_rows(int(config.mlcd.num_classes), int(config.mlcd.pad_classes_to))
        return {CENTERS: init_centers(rng, rows, int(config.model.embed_dim), str(config.mlcd.init_centers))}

    def param_groups(self, config: ml_collections.ConfigDict) -> list[tuple[str, dict[str, Any]]]:
        mult = float(config.mlcd.lr_mult)
        return [] if mult == 1.0 else [(PARAM_PATTERN, {"lr_mult": mult})]

    def forward_flops(self, config: ml_collections.ConfigDict, batch_size: int) -> float:
        """[B, r K] negative logits and [B, l] positive cosines."""
        cfg = config.mlcd
        scored = int(float(cfg.sample_rate) * int(cfg.num_classes)) + int(cfg.num_labels)
        return 2.0 * batch_size * scored * int(config.model.embed_dim)

    def loss(self, ctx: registry.LossContext) -> tuple[jax.Array, dict[str, jax.Array], PyTree]:
        cfg = ctx.config.mlcd
        centers = ctx.params[PARAMS_KEY][CENTERS]
        axes = class_axes(centers.shape[0], ctx.config, ctx.mesh)
        # Centres not split (rows not divisible by the devices): every device scores them all, on the whole batch.
        batch_axes = ctx.batch_axes if axes is not None else ()
        fn = partial(_partial_fc, num_classes=int(cfg.num_classes), sample_rate=float(cfg.sample_rate),
                     scale=float(cfg.scale), margin=float(cfg.margin), class_axis_name=axes)
        rows = P(join_axis_names(batch_axes))
        loss, metrics = shard_map_island(
            fn, ctx.mesh, batch_axes, ctx.outputs["image_emb"], ctx.batch[LABELS_FIELD], centers, ctx.rng,
            in_specs=(rows, rows, P(axes), P()), axis_name_arg="batch_axis_name")
        return loss, metrics, ctx.state
