"""Contrastive baselines: CLIP softmax, SigLIP sigmoid, and CLIP + positive-pair L2 (Chen et al. 2024).

Each loss is written once for a *local* block of rows. With ``axis_name=None`` the block is the whole
batch; inside ``shard_map`` with the batch split over ``axis_name`` every device gathers the other side's
embeddings and computes only its own rows of the logit matrix ([b_local, B], never [B, B]), and the row
sums are combined with ``psum``. Both paths give the same number.

With ``chunk_size`` set, the gathered side is also processed in column chunks: a scan over chunks of
``chunk_size`` keys keeps a running log-sum-exp (CLIP) or a running sum (SigLIP), and each chunk's logits
are recomputed in the backward pass (``jax.checkpoint``), so no device ever holds more than
[b_local, chunk_size] logits. Per-device memory then grows with the per-device batch and the chunk, not
with the global batch (apart from the gathered [B, D] embeddings). The value is the same as unchunked to
rounding. Knob: ``config.<objective>.chunk_size`` (0 = unchunked).

Precision: logits and reductions are computed in the inputs' precision with float32 as the floor, so
bfloat16 or float32 embeddings give float32 losses and float64 embeddings (with ``jax_enable_x64``) float64
losses (``clus_jax.objectives.precision``).
"""
from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from clus_jax.objectives import registry
from clus_jax.objectives.precision import compute_dtype
from clus_jax.parallel.collectives import (
    AxisName,
    all_gather_rows,
    all_sum,
    axis_size,
    batch_spec,
    shard_map_island,
    shard_offset,
)


def _logits(queries: jax.Array, keys: jax.Array, scale: jax.Array, dtype: jnp.dtype) -> jax.Array:
    """scale * queries @ keys^T, accumulated in ``dtype``."""
    return scale * jnp.einsum("bd,nd->bn", queries, keys, preferred_element_type=dtype)


def _softmax_ce_rows(
    queries: jax.Array, keys: jax.Array, scale: jax.Array, offset: jax.Array, dtype: jnp.dtype
) -> jax.Array:
    """Sum over local query rows of CE(scale * q @ K^T, positive at column offset + row)."""
    logits = _logits(queries, keys, scale, dtype)
    positives = jnp.take_along_axis(logits, (offset + jnp.arange(queries.shape[0]))[:, None], axis=1)[:, 0]
    return jnp.sum(jax.nn.logsumexp(logits, axis=1) - positives)


def _key_chunks(keys: jax.Array, chunk_size: int) -> tuple[jax.Array, jax.Array]:
    """Keys as [n_chunks, chunk_size, D] (zero-padded at the end) and the matching validity mask."""
    n, d = keys.shape
    n_chunks = -(-n // chunk_size)
    pad = n_chunks * chunk_size - n
    padded = jnp.pad(keys, ((0, pad), (0, 0))).reshape(n_chunks, chunk_size, d)
    valid = (jnp.arange(n_chunks * chunk_size) < n).reshape(n_chunks, chunk_size)
    return padded, valid


def _chunked_logsumexp_rows(
    queries: jax.Array, keys: jax.Array, scale: jax.Array, chunk_size: int, dtype: jnp.dtype
) -> jax.Array:
    """[b] log-sum-exp over all keys of scale * q @ k^T, holding at most [b, chunk_size] logits at a time."""
    chunks, valid = _key_chunks(keys, chunk_size)

    @jax.checkpoint
    def body(carry, xs):
        running_max, running_sum = carry
        k, ok = xs
        logits = jnp.where(ok[None, :], _logits(queries, k, scale, dtype), -jnp.inf)
        # The shift is a constant for the gradient: m + log(sum exp(l - m)) differentiates to a softmax.
        new_max = jax.lax.stop_gradient(jnp.maximum(running_max, jnp.max(logits, axis=1)))
        running_sum = running_sum * jnp.exp(running_max - new_max) + jnp.sum(jnp.exp(logits - new_max[:, None]), axis=1)
        return (new_max, running_sum), None

    # Derived from the queries so that, inside shard_map, the carry varies over the same mesh axes.
    zeros = queries[:, 0].astype(dtype) * 0.0
    init = (zeros - jnp.inf, zeros)
    (running_max, running_sum), _ = jax.lax.scan(body, init, (chunks, valid))
    return running_max + jnp.log(running_sum)


def _softmax_ce_rows_chunked(
    queries: jax.Array, keys: jax.Array, local_keys: jax.Array, scale: jax.Array, chunk_size: int, dtype: jnp.dtype
) -> jax.Array:
    """``_softmax_ce_rows`` without the [b, B] block: the positive of local row i is local key row i."""
    positives = scale * jnp.sum(queries.astype(dtype) * local_keys.astype(dtype), axis=1)
    return jnp.sum(_chunked_logsumexp_rows(queries, keys, scale, chunk_size, dtype) - positives)


def _use_chunks(chunk_size: int | None, num_keys: int) -> bool:
    return bool(chunk_size) and chunk_size < num_keys


def clip_loss(
    image_emb: jax.Array, text_emb: jax.Array, logit_scale: jax.Array, *, axis_name: AxisName = None,
    chunk_size: int | None = None,
) -> jax.Array:
    """Mean of image->text and text->image cross-entropies over the global batch (open_clip ClipLoss).

    ``chunk_size``: process the gathered side in chunks of this many columns (None or 0: all at once).
    """
    dtype = compute_dtype(image_emb, text_emb, logit_scale)
    b = image_emb.shape[0]
    total = b * axis_size(axis_name)
    offset = shard_offset(b, axis_name)
    texts, images = all_gather_rows(text_emb, axis_name), all_gather_rows(image_emb, axis_name)
    if _use_chunks(chunk_size, total):
        i2t = _softmax_ce_rows_chunked(image_emb, texts, text_emb, logit_scale, chunk_size, dtype)
        t2i = _softmax_ce_rows_chunked(text_emb, images, image_emb, logit_scale, chunk_size, dtype)
    else:
        i2t = _softmax_ce_rows(image_emb, texts, logit_scale, offset, dtype)
        t2i = _softmax_ce_rows(text_emb, images, logit_scale, offset, dtype)
    return all_sum(i2t + t2i, axis_name) / (2 * total)


def _labels(rows: jax.Array, columns: jax.Array, dtype: jnp.dtype) -> jax.Array:
    """[rows, columns] SigLIP labels: +1 where the global row and column indices match, else -1."""
    return (2.0 * (columns[None, :] == rows[:, None]) - 1.0).astype(dtype)


def _siglip_chunked_sum(
    image_emb: jax.Array, texts: jax.Array, logit_scale: jax.Array, logit_bias: jax.Array, offset: jax.Array,
    chunk_size: int, dtype: jnp.dtype,
) -> jax.Array:
    """sum of log_sigmoid(label * logit) over [b, B], holding at most [b, chunk_size] logits at a time."""
    chunks, valid = _key_chunks(texts, chunk_size)
    rows = offset + jnp.arange(image_emb.shape[0])

    @jax.checkpoint
    def body(total, xs):
        k, ok, start = xs
        logits = _logits(image_emb, k, logit_scale, dtype) + logit_bias
        labels = _labels(rows, start + jnp.arange(chunk_size), dtype)
        return total + jnp.sum(jnp.where(ok[None, :], jax.nn.log_sigmoid(labels * logits), 0.0)), None

    starts = jnp.arange(chunks.shape[0]) * chunk_size
    zero = image_emb[0, 0].astype(dtype) * 0.0  # varies like the local rows inside shard_map
    total, _ = jax.lax.scan(body, zero, (chunks, valid, starts))
    return total


def siglip_loss(
    image_emb: jax.Array, text_emb: jax.Array, logit_scale: jax.Array, logit_bias: jax.Array, *, axis_name: AxisName = None,
    chunk_size: int | None = None,
) -> jax.Array:
    """Pairwise sigmoid loss summed over all B x B pairs and divided by B (open_clip SigLipLoss).

    ``chunk_size``: process the gathered texts in chunks of this many columns (None or 0: all at once).
    """
    dtype = compute_dtype(image_emb, text_emb, logit_scale, logit_bias)
    b = image_emb.shape[0]
    total = b * axis_size(axis_name)
    offset = shard_offset(b, axis_name)
    texts = all_gather_rows(text_emb, axis_name)
    if _use_chunks(chunk_size, total):
        pairs = _siglip_chunked_sum(image_emb, texts, logit_scale, logit_bias, offset, chunk_size, dtype)
        return -all_sum(pairs, axis_name) / total
    logits = _logits(image_emb, texts, logit_scale, dtype) + logit_bias
    labels = _labels(offset + jnp.arange(b), jnp.arange(texts.shape[0]), dtype)
    return -all_sum(jnp.sum(jax.nn.log_sigmoid(labels * logits)), axis_name) / total


def positive_pair_l2(image_emb: jax.Array, text_emb: jax.Array, *, axis_name: AxisName = None) -> jax.Array:
    """mean_i ||g(x_i) - h(y_i)||^2 over matched pairs only (no negatives, no stop-gradient)."""
    dtype = compute_dtype(image_emb, text_emb)
    total = image_emb.shape[0] * axis_size(axis_name)
    sq = jnp.sum(jnp.square(image_emb.astype(dtype) - text_emb.astype(dtype)))
    return all_sum(sq, axis_name) / total


def clip_reg_loss(
    image_emb: jax.Array, text_emb: jax.Array, logit_scale: jax.Array, reg_weight: float, *, axis_name: AxisName = None,
    chunk_size: int | None = None,
) -> jax.Array:
    """CLIP + lambda * positive-pair L2 (Chen, Deng, Li, Gu, ICLR 2024).

    Normalisation: the CLIP term here is the *mean* of the two directions, (CE_i2t + CE_t2i) / 2 averaged over
    the batch (open_clip's ClipLoss). The paper writes its CLIP loss as the *sum* of the two directions' terms
    averaged over the batch, twice ours (taken from secondary sources; the full text was not read, so this
    factor is unconfirmed). Then ours is half of (CLIP_paper + 2 * lambda * L2): ``reg_weight`` = lambda here
    weighs the regulariser as lambda_paper = 2 * lambda does in the paper, so our 0.1 is the paper's 0.2. The
    regulariser is mean_i ||g(x_i) - h(y_i)||^2 = mean_i (2 - 2 cos_i) on unit rows; the paper gives no value
    of lambda (configs/clip_reg.py sweeps it).
    """
    return clip_loss(image_emb, text_emb, logit_scale, axis_name=axis_name, chunk_size=chunk_size) + reg_weight * positive_pair_l2(
        image_emb, text_emb, axis_name=axis_name
    )


#: Which quantiles of the per-sample margins the ``clip_reg`` objective logs at every step, by metric name.
MARGIN_QUANTILES = {"min": 0.0, **{f"p{q}": q / 100 for q in range(10, 100, 10)}, "max": 1.0}


def _max_negative_rows(
    queries: jax.Array, keys: jax.Array, offset: jax.Array, chunk_size: int | None, dtype: jnp.dtype
) -> jax.Array:
    """[b] largest score q_i . k_j over all keys j but local row i's positive (column offset + i), holding at
    most [b, chunk_size] scores at a time (all keys at once without chunks); -inf when there is no negative."""
    n = keys.shape[0]
    size = chunk_size if _use_chunks(chunk_size, n) else n
    chunks, valid = _key_chunks(keys, size)
    rows = offset + jnp.arange(queries.shape[0])

    def body(running, xs):
        k, ok, start = xs
        negative = ok[None, :] & (start + jnp.arange(size)[None, :] != rows[:, None])
        scores = jnp.einsum("bd,nd->bn", queries, k, preferred_element_type=dtype)
        return jnp.maximum(running, jnp.max(jnp.where(negative, scores, -jnp.inf), axis=1)), None

    init = queries[:, 0].astype(dtype) * 0.0 - jnp.inf  # varies like the local rows inside shard_map
    running, _ = jax.lax.scan(body, init, (chunks, valid, jnp.arange(chunks.shape[0]) * size))
    return running


def pair_margins(
    image_emb: jax.Array, text_emb: jax.Array, *, axis_name: AxisName = None, chunk_size: int | None = None,
) -> dict[str, jax.Array]:
    """The margin of Chen et al.'s theorems for each local pair i: its positive score <g(x_i), h(y_i)> minus the
    largest negative, over the other texts of the global batch ('i2t') and over the other images ('t2i').

    Cosine units (not times the logit scale); a negative margin is a pair the batch ranks wrongly. Rows as in
    ``clip_loss`` (local rows against the gathered other side, chunked alike); no gradient. The inputs pass an
    optimisation barrier, so XLA cannot merge these scores with the loss's logits and the loss compiles as it
    would without the margins.
    """
    image_emb, text_emb = jax.lax.optimization_barrier(jax.lax.stop_gradient((image_emb, text_emb)))
    dtype = compute_dtype(image_emb, text_emb)
    offset = shard_offset(image_emb.shape[0], axis_name)
    positives = jnp.sum(image_emb.astype(dtype) * text_emb.astype(dtype), axis=1)
    texts, images = all_gather_rows(text_emb, axis_name), all_gather_rows(image_emb, axis_name)
    return {"i2t": positives - _max_negative_rows(image_emb, texts, offset, chunk_size, dtype),
            "t2i": positives - _max_negative_rows(text_emb, images, offset, chunk_size, dtype)}


def margin_metrics(margins: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """``margin/<direction>/<q>`` for q in ``MARGIN_QUANTILES`` and ``mean``, of global [B] margins: the
    distribution the report draws as a histogram (``clus_jax.report``)."""
    out = {}
    for direction, m in margins.items():
        values = jnp.quantile(m, jnp.asarray(list(MARGIN_QUANTILES.values()), m.dtype))
        out.update({f"margin/{direction}/{name}": v for name, v in zip(MARGIN_QUANTILES, values)})
        out[f"margin/{direction}/mean"] = jnp.mean(m)
    return out


def on_mesh(fn, ctx: registry.LossContext, *batch_args: jax.Array, replicated_args: tuple = ()) -> jax.Array:
    """Runs ``fn(*batch_args, *replicated_args, axis_name=...)`` in a shard_map island over the batch axes.

    ``batch_args`` have their rows split over ``ctx.batch_axes``; ``replicated_args`` are whole on every
    device. See ``clus_jax.parallel.collectives.shard_map_island`` for other layouts.
    """
    specs = (batch_spec(ctx.batch_axes),) * len(batch_args) + (P(),) * len(replicated_args)
    return shard_map_island(fn, ctx.mesh, ctx.batch_axes, *batch_args, *replicated_args, in_specs=specs)


def _chunk_size(ctx: registry.LossContext, name: str) -> int:
    knobs = ctx.config.get(name)
    return int(knobs.get("chunk_size", 0) or 0) if knobs is not None else 0


def _validate_chunk_size(config, name: str) -> None:
    knobs = config.get(name)
    value = knobs.get("chunk_size", 0) if knobs is not None else 0
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise registry.ConfigError(f"config.{name}.chunk_size={value!r} must be an integer >= 0 (0 = unchunked)")


def _contrastive_metrics(ctx: registry.LossContext) -> dict[str, jax.Array]:
    img, txt = ctx.outputs["image_emb"], ctx.outputs["text_emb"]
    return {"pos_cosine": jnp.mean(jnp.sum(img * txt, axis=-1))}


class _Contrastive(registry.Objective):
    """What the three contrastive objectives share: one [B, B] logit matrix of the global batch."""

    def forward_flops(self, config, batch_size: int) -> float:
        return 2.0 * batch_size * batch_size * int(config.model.embed_dim)


@registry.register
class Clip(_Contrastive):
    name = "clip"
    defaults = {"chunk_size": 0}

    def validate(self, config):
        _validate_chunk_size(config, self.name)

    def loss(self, ctx):
        o = ctx.outputs
        fn = partial(clip_loss, chunk_size=_chunk_size(ctx, self.name))
        value = on_mesh(fn, ctx, o["image_emb"], o["text_emb"], replicated_args=(o["logit_scale"],))
        return value, _contrastive_metrics(ctx), ctx.state


@registry.register
class SigLip(_Contrastive):
    name = "siglip"
    defaults = {"chunk_size": 0}

    def validate(self, config):
        if config.model.get("logit_bias_init") is None:
            raise registry.ConfigError(
                "objective 'siglip' needs a learnable bias: set config.model.logit_bias_init (SigLIP uses -10)"
            )
        _validate_chunk_size(config, self.name)

    def loss(self, ctx):
        o = ctx.outputs
        fn = partial(siglip_loss, chunk_size=_chunk_size(ctx, self.name))
        value = on_mesh(fn, ctx, o["image_emb"], o["text_emb"], replicated_args=(o["logit_scale"], o["logit_bias"]))
        return value, _contrastive_metrics(ctx), ctx.state


@registry.register
class ClipReg(_Contrastive):
    """``clip_reg_loss`` (which states lambda's factor against the paper); logs every step the quantiles of the
    per-sample margins (``pair_margins``, ``margin_metrics``) as ``train/clip_reg/margin/<i2t|t2i>/<q>``."""

    name = "clip_reg"
    defaults = {"reg_weight": 0.1, "chunk_size": 0}

    def validate(self, config):
        weight = config.clip_reg.reg_weight
        if not isinstance(weight, (int, float)) or weight < 0:
            raise registry.ConfigError(f"config.clip_reg.reg_weight={weight!r} must be a number >= 0")
        _validate_chunk_size(config, self.name)

    def loss(self, ctx):
        o = ctx.outputs
        weight = float(ctx.config.clip_reg.reg_weight)
        chunk_size = _chunk_size(ctx, self.name)
        clip = on_mesh(partial(clip_loss, chunk_size=chunk_size), ctx, o["image_emb"], o["text_emb"],
                       replicated_args=(o["logit_scale"],))
        reg = on_mesh(positive_pair_l2, ctx, o["image_emb"], o["text_emb"])
        # Per-sample margins stay split over the batch axes; their quantiles are taken on the global batch.
        margins = shard_map_island(partial(pair_margins, chunk_size=chunk_size), ctx.mesh, ctx.batch_axes,
                                   o["image_emb"], o["text_emb"], out_specs=batch_spec(ctx.batch_axes))
        metrics = {**_contrastive_metrics(ctx), "clip": clip, "pair_l2": reg, **margin_metrics(margins)}
        return clip + weight * reg, metrics, ctx.state
