"""Contrastive baselines: CLIP softmax, SigLIP sigmoid, and CLIP + positive-pair L2 (Chen et al. 2024).

Each loss is written once for a *local* block of rows. With ``axis_name=None`` the block is the whole
batch; inside ``shard_map`` with the batch split over ``axis_name`` every device gathers the other side's
embeddings and computes only its own rows of the logit matrix ([b_local, B], never [B, B]), and the row
sums are combined with ``psum``. Both paths give the same number.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from clus_jax.objectives import registry

AxisName = str | Sequence[str] | None


def _axis_size(axis_name: AxisName) -> int:
    return 1 if not axis_name else jax.lax.psum(1, axis_name)


def _gather(x: jax.Array, axis_name: AxisName) -> jax.Array:
    return x if not axis_name else jax.lax.all_gather(x, axis_name, axis=0, tiled=True)


def _psum(x: jax.Array, axis_name: AxisName) -> jax.Array:
    return x if not axis_name else jax.lax.psum(x, axis_name)


def _row_offset(local_rows: int, axis_name: AxisName) -> jax.Array:
    return jnp.int32(0) if not axis_name else jax.lax.axis_index(axis_name) * local_rows


def _softmax_ce_rows(queries: jax.Array, keys: jax.Array, scale: jax.Array, offset: jax.Array) -> jax.Array:
    """Sum over local query rows of CE(scale * q @ K^T, positive at column offset + row)."""
    logits = scale * jnp.einsum("bd,nd->bn", queries, keys, preferred_element_type=jnp.float32)
    positives = jnp.take_along_axis(logits, (offset + jnp.arange(queries.shape[0]))[:, None], axis=1)[:, 0]
    return jnp.sum(jax.nn.logsumexp(logits, axis=1) - positives)


def clip_loss(image_emb: jax.Array, text_emb: jax.Array, logit_scale: jax.Array, *, axis_name: AxisName = None) -> jax.Array:
    """Mean of image->text and text->image cross-entropies over the global batch (open_clip ClipLoss)."""
    b = image_emb.shape[0]
    total = b * _axis_size(axis_name)
    offset = _row_offset(b, axis_name)
    i2t = _softmax_ce_rows(image_emb, _gather(text_emb, axis_name), logit_scale, offset)
    t2i = _softmax_ce_rows(text_emb, _gather(image_emb, axis_name), logit_scale, offset)
    return _psum(i2t + t2i, axis_name) / (2 * total)


def siglip_loss(
    image_emb: jax.Array, text_emb: jax.Array, logit_scale: jax.Array, logit_bias: jax.Array, *, axis_name: AxisName = None
) -> jax.Array:
    """Pairwise sigmoid loss summed over all B x B pairs and divided by B (open_clip SigLipLoss)."""
    b = image_emb.shape[0]
    total = b * _axis_size(axis_name)
    offset = _row_offset(b, axis_name)
    texts = _gather(text_emb, axis_name)
    logits = logit_scale * jnp.einsum("bd,nd->bn", image_emb, texts, preferred_element_type=jnp.float32) + logit_bias
    labels = 2.0 * (jnp.arange(texts.shape[0])[None, :] == (offset + jnp.arange(b))[:, None]) - 1.0
    return -_psum(jnp.sum(jax.nn.log_sigmoid(labels * logits)), axis_name) / total


def positive_pair_l2(image_emb: jax.Array, text_emb: jax.Array, *, axis_name: AxisName = None) -> jax.Array:
    """mean_i ||g(x_i) - h(y_i)||^2 over matched pairs only (no negatives, no stop-gradient)."""
    total = image_emb.shape[0] * _axis_size(axis_name)
    sq = jnp.sum(jnp.square(image_emb.astype(jnp.float32) - text_emb.astype(jnp.float32)))
    return _psum(sq, axis_name) / total


def clip_reg_loss(
    image_emb: jax.Array, text_emb: jax.Array, logit_scale: jax.Array, reg_weight: float, *, axis_name: AxisName = None
) -> jax.Array:
    """CLIP + lambda * positive-pair L2 (Chen, Deng, Li, Gu, ICLR 2024)."""
    return clip_loss(image_emb, text_emb, logit_scale, axis_name=axis_name) + reg_weight * positive_pair_l2(
        image_emb, text_emb, axis_name=axis_name
    )


def on_mesh(fn, ctx: registry.LossContext, *batch_args: jax.Array, replicated_args: tuple = ()) -> jax.Array:
    """Runs ``fn(*batch_args, *replicated_args, axis_name=...)`` in a shard_map island over the batch axes."""
    axes = ctx.batch_axes
    if not axes:
        return fn(*batch_args, *replicated_args, axis_name=None)
    spec = P(axes)
    mapped = jax.shard_map(
        lambda *a: fn(*a, axis_name=axes),
        mesh=ctx.mesh,
        in_specs=tuple(spec for _ in batch_args) + tuple(P() for _ in replicated_args),
        out_specs=P(),
    )
    return mapped(*batch_args, *replicated_args)


def _contrastive_metrics(ctx: registry.LossContext) -> dict[str, jax.Array]:
    img, txt = ctx.outputs["image_emb"], ctx.outputs["text_emb"]
    return {"pos_cosine": jnp.mean(jnp.sum(img * txt, axis=-1))}


@registry.register
class Clip(registry.Objective):
    name = "clip"

    def loss(self, ctx):
        o = ctx.outputs
        value = on_mesh(clip_loss, ctx, o["image_emb"], o["text_emb"], replicated_args=(o["logit_scale"],))
        return value, _contrastive_metrics(ctx), ctx.state


@registry.register
class SigLip(registry.Objective):
    name = "siglip"

    def validate(self, config):
        if config.model.get("logit_bias_init") is None:
            raise registry.ConfigError(
                "objective 'siglip' needs a learnable bias: set config.model.logit_bias_init (SigLIP uses -10)"
            )

    def loss(self, ctx):
        o = ctx.outputs
        value = on_mesh(siglip_loss, ctx, o["image_emb"], o["text_emb"], replicated_args=(o["logit_scale"], o["logit_bias"]))
        return value, _contrastive_metrics(ctx), ctx.state


@registry.register
class ClipReg(registry.Objective):
    name = "clip_reg"
    defaults = {"reg_weight": 0.1}

    def validate(self, config):
        weight = config.clip_reg.reg_weight
        if not isinstance(weight, (int, float)) or weight < 0:
            raise registry.ConfigError(f"config.clip_reg.reg_weight={weight!r} must be a number >= 0")

    def loss(self, ctx):
        o = ctx.outputs
        weight = float(ctx.config.clip_reg.reg_weight)
        clip = on_mesh(clip_loss, ctx, o["image_emb"], o["text_emb"], replicated_args=(o["logit_scale"],))
        reg = on_mesh(positive_pair_l2, ctx, o["image_emb"], o["text_emb"])
        return clip + weight * reg, {**_contrastive_metrics(ctx), "clip": clip, "pair_l2": reg}, ctx.state
