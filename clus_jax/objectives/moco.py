"""BriVL (WenLan; Huo et al. 2021): cross-modal MoCo with momentum towers and two negative queues.

``config.objectives = {'brivl': 1.0}`` (or next to others, e.g. ``{'brivl': 1.0, 'clip': 0.5}``).

What follows BriVL's released ``VL_model.forward`` (BAAI-WuDao/BriVL, ``BriVL-code-inference/models/
vl_model.py``; its training script was never released):
  * query towers (the trained image and text towers) give ``q_I``, ``q_T``; momentum copies of both towers
    (with their projection heads) give the keys ``k_I``, ``k_T``, without gradient;
  * the momentum update ``theta_k <- m theta_k + (1 - m) theta_q`` runs *before* the keys are computed, from
    the query towers as they are at the start of the step (m = 0.99);
  * image->text logits ``[q_I . k_T, q_I . Queue_T] / T`` and text->image ``[q_T . k_I, q_T . Queue_I] / T``
    with the positive in column 0 and a fixed temperature T = 0.07; the loss is the *sum* of the two
    cross-entropies (no 0.5 average);
  * optional multi-label positives (``multi_label_topk = k > 0``, off in BriVL's code): queue item j is a
    further positive of row b when it is in the top k of both ``k_T[b] . Queue_T`` and ``k_I[b] . Queue_I``;
    each direction is then the sum over positives of -log softmax, divided by B;
  * two FIFO queues (length 9600, a multiple of the global batch) of the all-gathered keys, written at a
    ring pointer after the loss (``queue[ptr:ptr+B] = keys; ptr = (ptr + B) % K``), initialised with random
    unit rows (as ``torch.randn`` + ``normalize``), so they supply negatives from the first step.
What is a choice here: the towers are this project's ViT and text transformer (BriVL used a detector-box
EfficientNet and a Chinese RoBERTa); MoCo's shuffle-BN is not needed (the towers use LayerNorm); the two
queues share one pointer (they are always written together, so BriVL's two pointers are always equal);
``learnable_temperature=True`` uses the model's learnable logit scale (T = 1 / scale) instead of 0.07;
``momentum_final`` != ``momentum`` gives a cosine momentum schedule (DINO-style) instead of a constant.

Sharding: the momentum towers are sharded like the student (a copy in the objective's state); the loss
runs in a shard_map island with query and key rows split over the batch axes, every device scoring its own
rows against the replicated queues ([b_local, 1 + K] logits, never [B, K]); the queues and the pointer are
replicated and written with the global keys, so every device holds the same queue (as every BriVL GPU does).
"""
from __future__ import annotations

import numbers
from functools import partial
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from jax import lax
from jax.sharding import PartitionSpec as P

from clus_jax.objectives import registry, teachers
from clus_jax.objectives.precision import compute_dtype
from clus_jax.parallel.collectives import AxisName, all_sum, axis_size, batch_spec, shard_map_island

PyTree = Any
QUEUE_AXES = (None, None)  # replicated: every device scores its rows against the whole queue


def _rows_loss(query: jax.Array, key: jax.Array, queue: jax.Array, temperature, extra_positives: jax.Array | None,
               axis_name: AxisName) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(sum over global rows of -log softmax at the positives / B, mean positive cosine, mean queue cosine)."""
    dtype = compute_dtype(query, key, queue, temperature)
    q = query.astype(dtype)
    k = lax.stop_gradient(key).astype(dtype)
    negatives = lax.stop_gradient(queue).astype(dtype)
    pos = jnp.sum(q * k, axis=-1, keepdims=True)  # [b, 1]
    neg = jnp.einsum("bd,kd->bk", q, negatives, preferred_element_type=dtype)  # [b, K]
    logits = jnp.concatenate([pos, neg], axis=-1) / jnp.asarray(temperature, dtype)
    neg_log_softmax = jax.nn.logsumexp(logits, axis=-1, keepdims=True) - logits
    per_row = neg_log_softmax[:, 0]
    if extra_positives is not None:
        per_row = per_row + jnp.sum(jnp.where(extra_positives, neg_log_softmax[:, 1:], 0.0), axis=-1)
    rows = query.shape[0] * axis_size(axis_name)
    mean = lambda x: all_sum(jnp.sum(x), axis_name) / rows  # noqa: E731
    return mean(per_row), mean(pos[:, 0]), mean(jnp.mean(neg, axis=-1))


def moco_loss(query: jax.Array, key: jax.Array, queue: jax.Array, temperature: float | jax.Array, *,
              axis_name: AxisName = None) -> jax.Array:
    """MoCo's InfoNCE: ``logits = [q . k, q . queue^T] / T``, cross-entropy with the positive in column 0.

    ``query``, ``key`` [B, D] and ``queue`` [K, D] arrive L2-normalised; the queue is the one before this
    step's keys are enqueued; no gradient flows into ``key`` or ``queue``. Batch mean. Inside ``shard_map``
    with the rows of ``query`` and ``key`` split over ``axis_name`` the result equals the single-device value.
    """
    return _rows_loss(query, key, queue, temperature, None, axis_name)[0]


def multi_label_positives(image_key: jax.Array, text_key: jax.Array, image_queue: jax.Array, text_queue: jax.Array,
                          topk: int) -> jax.Array:
    """[B, K] bool: queue item j is in the top ``topk`` of both ``text_key[b] . text_queue`` and
    ``image_key[b] . image_queue`` (BriVL's false-negative mask, the same for both directions)."""
    def top(keys, queue):
        sims = jnp.einsum("bd,kd->bk", lax.stop_gradient(keys), lax.stop_gradient(queue),
                          preferred_element_type=compute_dtype(keys, queue))
        _, idx = lax.top_k(sims, topk)
        return jnp.any(jax.nn.one_hot(idx, queue.shape[0], dtype=jnp.bool_), axis=1)

    return top(text_key, text_queue) & top(image_key, image_queue)


def _brivl_terms(image_q, text_q, image_k, text_k, image_queue, text_queue, temperature, *, multi_label_topk: int,
                 axis_name: AxisName) -> tuple[jax.Array, dict[str, jax.Array]]:
    mask = (multi_label_positives(image_k, text_k, image_queue, text_queue, multi_label_topk)
            if multi_label_topk else None)
    i2t, i2t_pos, i2t_neg = _rows_loss(image_q, text_k, text_queue, temperature, mask, axis_name)
    t2i, t2i_pos, t2i_neg = _rows_loss(text_q, image_k, image_queue, temperature, mask, axis_name)
    metrics = {"i2t": i2t, "t2i": t2i, "positive_cosine": 0.5 * (i2t_pos + t2i_pos),
               "queue_cosine": 0.5 * (i2t_neg + t2i_neg)}
    if mask is not None:
        count = all_sum(jnp.sum(mask.astype(jnp.float32)), axis_name)
        metrics["extra_positives_per_row"] = count / (image_q.shape[0] * axis_size(axis_name))
    return i2t + t2i, metrics


def brivl_loss(image_q: jax.Array, text_q: jax.Array, image_k: jax.Array, text_k: jax.Array, image_queue: jax.Array,
               text_queue: jax.Array, temperature: float | jax.Array = 0.07, multi_label_topk: int = 0, *,
               axis_name: AxisName = None) -> jax.Array:
    """BriVL's loss: image->text (``image_q`` against ``text_k`` and the text queue) **plus** text->image.

    All inputs L2-normalised ([B, D] queries and keys, [K, D] queues before this step's enqueue); keys and
    queues get no gradient. ``multi_label_topk`` > 0 adds BriVL's multi-label positives (see the module
    docstring). Sharded like ``moco_loss``.
    """
    return _brivl_terms(image_q, text_q, image_k, text_k, image_queue, text_queue, temperature,
                        multi_label_topk=int(multi_label_topk), axis_name=axis_name)[0]


def enqueue(queue: jax.Array, pointer: jax.Array, keys: jax.Array) -> tuple[jax.Array, jax.Array]:
    """MoCo's ring buffer: ``queue[ptr:ptr+B] = keys``, ``ptr = (ptr + B) % K``; K a multiple of B.

    ``keys`` are the global (all-gathered) keys [B, D]; ``pointer`` an int32 scalar.
    """
    size, batch = queue.shape[0], keys.shape[0]
    if size % batch:
        raise ValueError(f"queue length {size} is not a multiple of the batch {batch}")
    keys = lax.stop_gradient(keys).astype(queue.dtype)
    queue = lax.dynamic_update_slice(queue, keys, (jnp.asarray(pointer, jnp.int32), jnp.int32(0)))
    return queue, ((pointer + batch) % size).astype(jnp.int32)


def momentum_update(momentum_towers: PyTree, towers: PyTree, m: float | jax.Array) -> PyTree:
    """``theta_k <- m theta_k + (1 - m) theta_q`` for every leaf (BriVL's ``_momentum_update_key_encoder``)."""
    return teachers.ema_update(momentum_towers, lax.stop_gradient(towers), m)


def random_unit_rows(key: jax.Array, length: int, dim: int) -> jax.Array:
    """A queue's initial content: Gaussian rows scaled to unit length (BriVL: randn, normalised)."""
    x = jax.random.normal(key, (length, dim), jnp.float32)
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def _check(config: ml_collections.ConfigDict, key: str, ok, requirement: str) -> None:
    value = config.brivl[key]
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not ok(value):
        raise registry.ConfigError(f"config.brivl.{key}={value!r} must be {requirement}")


@registry.register
class BriVL(registry.Objective):
    """Cross-modal MoCo: momentum towers in the objective state, two key queues, summed InfoNCE."""

    name = "brivl"
    defaults = {
        "queue_length": 9600,  # per modality; a multiple of the global batch (BriVL: 9600)
        "momentum": 0.99,  # momentum of the key towers at step 0 (BriVL: 0.99) ...
        "momentum_final": 0.99,  # ... cosine-scheduled to this at total_steps (equal: constant, as BriVL)
        "temperature": 0.07,  # fixed (BriVL)
        "learnable_temperature": False,  # True: T = 1 / the model's learnable logit scale
        "multi_label_topk": 0,  # > 0: BriVL's multi-label positives (off in its code)
    }

    def validate(self, config: ml_collections.ConfigDict) -> None:
        batch = int(config.batch_size)
        _check(config, "queue_length", lambda v: isinstance(v, numbers.Integral) and v > 0 and v % batch == 0,
               f"a positive multiple of the global batch config.batch_size={batch} "
               f"(e.g. {max(int(config.brivl.queue_length) // batch, 1) * batch})")
        _check(config, "momentum", lambda v: 0 <= v <= 1, "in [0, 1]")
        _check(config, "momentum_final", lambda v: 0 <= v <= 1, "in [0, 1]")
        _check(config, "temperature", lambda v: v > 0, "> 0")
        _check(config, "multi_label_topk",
               lambda v: isinstance(v, numbers.Integral) and 0 <= v <= int(config.brivl.queue_length),
               "an integer in [0, config.brivl.queue_length]")
        if not isinstance(config.brivl.learnable_temperature, bool):
            raise registry.ConfigError(f"config.brivl.learnable_temperature={config.brivl.learnable_temperature!r} "
                                       "must be True or False")

    def init_state(self, params: PyTree, config: ml_collections.ConfigDict) -> PyTree:
        length, dim = int(config.brivl.queue_length), int(config.model.embed_dim)
        rng = jax.random.fold_in(jax.random.PRNGKey(int(config.seed)), 0x62726976)  # the queues' own stream
        image_rng, text_rng = jax.random.split(rng)
        return {
            "momentum_towers": registry.model_params(params),  # boxed like the student: sharded like it
            "image_queue": nn.LogicallyPartitioned(random_unit_rows(image_rng, length, dim), QUEUE_AXES),
            "text_queue": nn.LogicallyPartitioned(random_unit_rows(text_rng, length, dim), QUEUE_AXES),
            "pointer": jnp.zeros([], jnp.int32),
            "keys_written": jnp.zeros([], jnp.int32),
        }

    def loss(self, ctx: registry.LossContext) -> tuple[jax.Array, dict[str, jax.Array], PyTree]:
        cfg, state = ctx.config.brivl, ctx.state
        m = teachers.momentum(ctx.step, float(cfg.momentum), float(cfg.momentum_final), int(ctx.config.total_steps))
        towers = momentum_update(state["momentum_towers"], registry.model_params(ctx.params), m)  # before the keys
        keys = lax.stop_gradient(ctx.apply_model(towers, ctx.batch))
        temperature = 1.0 / ctx.outputs["logit_scale"] if cfg.learnable_temperature else float(cfg.temperature)
        rows = batch_spec(ctx.batch_axes)
        loss, metrics = shard_map_island(
            partial(_brivl_terms, multi_label_topk=int(cfg.multi_label_topk)), ctx.mesh, ctx.batch_axes,
            ctx.outputs["image_emb"], ctx.outputs["text_emb"], keys["image_emb"], keys["text_emb"],
            state["image_queue"], state["text_queue"], temperature,
            in_specs=(rows, rows, rows, rows, P(), P(), P()),
        )
        image_queue, pointer = enqueue(state["image_queue"], state["pointer"], keys["image_emb"])
        text_queue, _ = enqueue(state["text_queue"], state["pointer"], keys["text_emb"])
        length = state["image_queue"].shape[0]
        written = jnp.minimum(state["keys_written"] + keys["image_emb"].shape[0], length)
        metrics.update(queue_fill=state["keys_written"].astype(jnp.float32) / length, momentum=m,
                       temperature=jnp.asarray(temperature, jnp.float32))
        new_state = {"momentum_towers": towers, "image_queue": image_queue, "text_queue": text_queue,
                     "pointer": pointer, "keys_written": written}
        return loss, metrics, new_state

    def forward_flops(self, config: ml_collections.ConfigDict, batch_size: int) -> float:
        """Both directions' [B, 1 + K] logits."""
        return 2.0 * 2.0 * batch_size * (1 + int(config.brivl.queue_length)) * int(config.model.embed_dim)

    def no_grad_flops(self, config: ml_collections.ConfigDict, batch_size: int) -> float:
        """The momentum towers' forward, and the multi-label similarities when on."""
        from clus_jax.models.flops import towers_forward_flops

        sims = 2.0 * 2.0 * batch_size * int(config.brivl.queue_length) * int(config.model.embed_dim)
        return towers_forward_flops(config, batch_size) + (sims if int(config.brivl.multi_label_topk) else 0.0)
