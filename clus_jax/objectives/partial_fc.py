"""Partial FC: the K class centres of MLCD sharded over every device, and the per-shard negative sampling.

The centres parameter has K rounded up to a multiple of ``pad_classes_to`` (256) rows, so that K = 1,000,000
splits evenly over 8, 64 or 256 devices (unicom gives shards uneven sizes instead); padding rows are never
labelled, drawn only by a shard with too few real rows, and masked out of the loss, which reads them as zeros
so that they get an exact zero gradient whatever they hold. The class axis follows the 'classes' logical rule
(data x fsdp x tensor: every device), and the loss runs in one shard_map island where each device all-gathers
the embeddings and labels, samples its own centres and computes [B_global, int(r * K / n)] logits; the
positive term is summed over shards (each positive lives on one) and the negative term is a distributed
log-sum-exp, so no device holds [B, K]. Sampling follows deepglint/unicom ``PartialFC_V2``: per shard, every
positive of the batch plus random others, ``num_sample = int(r * num_local)``.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax import lax
from jax.sharding import Mesh

from clus_jax.objectives.cluster_centers import load_centers
from clus_jax.objectives.mlcd_math import local_labels, mlcd_terms
from clus_jax.parallel import partitioning
from clus_jax.parallel.collectives import AxisName, all_gather_rows, all_sum, axis_size, join_axis_names, shard_offset

#: The centres' logical axes: classes split over the mesh, features whole.
LOGICAL_AXES = ("classes", "proj")
#: unicom's random centres: N(0, 0.01).
INIT_STDDEV = 0.01


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


def partial_fc_loss(embeddings: jax.Array, positive_labels: jax.Array, centers: jax.Array, rng: jax.Array, *,
                num_classes: int, sample_rate: float, scale: float, margin: float, batch_axis_name: AxisName,
                class_axis_name: AxisName) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The objective's loss on local blocks: rows split over the batch axes, centres over the class axes.

    ``centers`` holds this shard's rows of the (padded) parameter; rows with a global id >= ``num_classes``
    are padding: read as zeros whatever they hold (the zero rows after a k-means file, random ones), masked
    out of every term, so they never change the loss and get an exact zero gradient.
    """
    e = all_gather_rows(embeddings, batch_axis_name)
    labels = all_gather_rows(positive_labels, batch_axis_name)
    num_local = centers.shape[0]
    num_sample = samples_per_shard(num_local, sample_rate)
    real = shard_offset(num_local, class_axis_name) + jnp.arange(num_local) < num_classes
    if num_local * axis_size(class_axis_name) > num_classes:  # padding rows: zeros, no gradient
        centers = jnp.where(real[:, None], centers, jnp.zeros((), centers.dtype))
    candidates, mask = None, real
    if num_sample < num_local:
        shard = lax.axis_index(class_axis_name) if join_axis_names(class_axis_name) else 0
        local, owned = local_labels(labels, num_local, class_axis_name)
        candidates = sample_negatives(shard_rng(rng, shard), jnp.where(owned, local, -1), num_local, num_sample,
                                      valid=real)
        mask = real[candidates]
    terms = mlcd_terms(e, labels, centers, candidates, mask, scale=scale, margin=margin, axis_name=class_axis_name)
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


def class_axes(num_classes: int, config: ml_collections.ConfigDict, mesh: Mesh) -> AxisName:
    """Mesh axes the K centres are split over: the 'classes' logical rule, as the parameter is placed."""
    rules = [tuple(r) for r in config.logical_axis_rules]
    spec = partitioning.logical_to_spec(LOGICAL_AXES, (num_classes, int(config.model.embed_dim)), rules, mesh)
    return join_axis_names(spec[0] if len(spec) else None)


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
