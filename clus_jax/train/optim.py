"""Optimizer: AdamW with warmup + cosine, global-norm clipping, a weight-decay mask and step-based freezing.

Freezing is optimizer masking, not a zeroed gradient: while a group is frozen its Adam moments, its
weight decay and its update are all untouched, as when PyTorch skips a parameter whose grad is None.
"""
from __future__ import annotations

import re
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import optax

PyTree = Any


def learning_rate_schedule(cfg: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to ``lr`` then cosine decay to ``lr * final_lr_fraction``."""
    warmup = int(cfg.warmup_steps)
    if cfg.get("schedule", "cosine") == "constant":
        return optax.join_schedules(
            [optax.linear_schedule(0.0, cfg.lr, max(warmup, 1)), optax.constant_schedule(cfg.lr)], [warmup]
        )
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=cfg.lr,
        warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1),
        end_value=cfg.lr * cfg.get("final_lr_fraction", 0.0),
    )


def path_str(path: tuple) -> str:
    parts = []
    for entry in path:
        key = getattr(entry, "key", getattr(entry, "name", getattr(entry, "idx", entry)))
        parts.append(str(key))
    return "/".join(parts)


def decay_mask(params: PyTree) -> PyTree:
    """Decay matrices only: no decay on norms, biases, logit scale/bias (open_clip's exclusion rule)."""
    return jax.tree.map(lambda p: p.ndim >= 2, params)


class FreezeState(NamedTuple):
    count: jax.Array
    inner: Any


def freeze_until(inner: optax.GradientTransformation, until_step: int) -> optax.GradientTransformation:
    """Runs ``inner`` only from ``until_step`` on; before that updates are zero and inner state is kept."""

    def init(params):
        return FreezeState(jnp.zeros([], jnp.int32), inner.init(params))

    def update(updates, state, params=None):
        new_updates, new_inner = inner.update(updates, state.inner, params)
        frozen = state.count < until_step
        new_updates = jax.tree.map(lambda u: jnp.where(frozen, jnp.zeros_like(u), u), new_updates)
        new_inner = jax.tree.map(lambda n, o: jnp.where(frozen, o, n), new_inner, state.inner)
        return new_updates, FreezeState(state.count + 1, new_inner)

    return optax.GradientTransformation(init, update)


def param_labels(params: PyTree, freeze_rules: Sequence[tuple[str, int]]) -> PyTree:
    """'train' or 'freeze_<i>' per parameter, first matching regex wins."""

    def label(path, _):
        name = path_str(path)
        for i, (pattern, _until) in enumerate(freeze_rules):
            if re.search(pattern, name):
                return f"freeze_{i}"
        return "train"

    return jax.tree_util.tree_map_with_path(label, params)


def build_optimizer(
    cfg: ml_collections.ConfigDict, total_steps: int, freeze_rules: Sequence[tuple[str, int]] = ()
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The full chain; per-group Adam + decay so frozen groups keep their moments untouched."""
    schedule = learning_rate_schedule(cfg, total_steps)

    def adamw_direction() -> optax.GradientTransformation:
        return optax.chain(
            optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2, eps=cfg.eps),
            optax.add_decayed_weights(cfg.weight_decay, mask=decay_mask),
        )

    freeze_rules = [(p, int(u)) for p, u in freeze_rules if int(u) > 0]
    if freeze_rules:
        groups = {"train": adamw_direction()}
        for i, (_, until) in enumerate(freeze_rules):
            groups[f"freeze_{i}"] = freeze_until(adamw_direction(), until)
        direction = optax.multi_transform(groups, lambda p: param_labels(p, freeze_rules))
    else:
        direction = adamw_direction()
    parts = []
    if cfg.get("grad_clip_norm"):
        parts.append(optax.clip_by_global_norm(cfg.grad_clip_norm))
    parts += [direction, optax.scale_by_learning_rate(schedule)]
    return optax.chain(*parts), schedule
