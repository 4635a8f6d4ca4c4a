"""MLCD (An, Yang, Dai, Feng, Deng, ECCV 2024): multi-label cluster discrimination over sharded class centres.

``config.objectives = {'mlcd': 1.0}``: image-only batches with a ``cluster_labels [l]`` field (the l nearest
k-means centres of each image, -1 = padding), a K-way normalised classifier owned by the objective
(``params['mlcd']['centers']``), and per sample (paper Eq. 5)

    L = log(1 + sum_{i in P} exp(-s_i)) + log(1 + sum_{j in N} exp(s_j)),
    s_i = scale * cos(theta_i + margin)  (positives),   s_j = scale * cos(theta_j)  (sampled negatives),

averaged over the batch. The pure functions are public: ``mlcd_loss`` and UNICOM's single-label
``margin_softmax_loss`` (``mlcd_math.py``), the Partial-FC sampler ``sample_negatives`` and the sharded centres
(``partial_fc.py``), the centres of a clustering output (``cluster_centers.py``).

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

Sharding: the centres are split over every device with Partial-FC sampling per shard; their K rows are padded
to a multiple of ``pad_classes_to``, and the padding rows never enter the loss or its gradient (``partial_fc.py``).
"""
from __future__ import annotations

import numbers
from functools import partial
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.sharding import PartitionSpec as P

from clus_jax.data.fields import IMAGE, FieldSpec
from clus_jax.objectives import registry
from clus_jax.objectives.cluster_centers import centers_shape
from clus_jax.objectives.partial_fc import class_axes, init_centers, padded_rows, partial_fc_loss
from clus_jax.parallel.collectives import join_axis_names, shard_map_island

PyTree = Any

#: Where the centres live (``params['mlcd']['centers']``) and their parameter-path regex.
PARAMS_KEY = "mlcd"
CENTERS = "centers"
PARAM_PATTERN = r"^mlcd/"
#: The batch field of positive labels, [l] int32 per example, -1 = padding.
LABELS_FIELD = "cluster_labels"


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
                shape = centers_shape(path)
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
        fn = partial(partial_fc_loss, num_classes=int(cfg.num_classes), sample_rate=float(cfg.sample_rate),
                     scale=float(cfg.scale), margin=float(cfg.margin), class_axis_name=axes)
        rows = P(join_axis_names(batch_axes))
        loss, metrics = shard_map_island(
            fn, ctx.mesh, batch_axes, ctx.outputs["image_emb"], ctx.batch[LABELS_FIELD], centers, ctx.rng,
            in_specs=(rows, rows, P(axes), P()), axis_name_arg="batch_axis_name")
        return loss, metrics, ctx.state
