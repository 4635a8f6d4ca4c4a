"""Optimizer: AdamW with warmup + cosine, global-norm clipping, a weight-decay mask and parameter groups.

Precision: parameters and both Adam moments are float32 whatever ``config.model.dtype`` computes in;
``config.optim.mu_dtype = 'bfloat16'`` stores the first moment in bfloat16 (the update math stays float32).

Parameter groups (``config.param_groups``, then each objective's ``param_groups``) are (regex over
parameter paths, options) pairs, first match wins: a learning-rate multiplier, weight decay on or off, a
trainable step window, or frozen for the whole run. A window is optimizer masking, not a zeroed gradient:
while a group is outside its window its Adam moments, its weight decay and its update are all untouched,
as when PyTorch skips a parameter whose grad is None. A group frozen for the whole run has no optimizer
state at all, and the train step computes no gradient for it (``frozen_mask``).
"""
from __future__ import annotations

import re
from typing import Any, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import optax

from clus_jax.common.trees import path_str
from clus_jax.config.check import MOMENT_DTYPES

PyTree = Any


def learning_rate_schedule(cfg: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to ``lr`` then cosine decay to ``lr * final_lr_fraction`` over
    ``cfg.schedule_steps`` steps (0: ``total_steps``; longer for a run that stops before its schedule ends)."""
    total_steps = int(cfg.get("schedule_steps") or 0) or total_steps
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


def decay_mask(params: PyTree) -> PyTree:
    """Decay matrices only: no decay on norms, biases, logit scale/bias (open_clip's exclusion rule)."""
    return jax.tree.map(lambda p: p.ndim >= 2, params)


#: Options of a parameter group and their defaults (``config.param_groups`` entries, big_vision style).
GROUP_OPTIONS = {
    "lr_mult": 1.0,  # the group's learning rate is lr_mult x the schedule
    "decay": None,  # weight decay: None = the default rule (matrices only), True = every leaf, False = none
    "trainable_from": 0,  # frozen (no update, no decay, Adam moments untouched) before this step
    "trainable_until": None,  # ... and again from this step on (None = to the end)
    "frozen": False,  # frozen for the whole run: no gradient computed, no optimizer state, no decay
}
DEFAULT_GROUP = "default"
FROZEN_GROUP = "frozen"


def check_param_groups(groups: Sequence[tuple[str, Mapping[str, Any]]], key: str = "config.param_groups") -> None:
    """Raises ValueError naming ``key[i]`` for an entry that is not (valid regex, known options)."""
    for i, group in enumerate(groups):
        where = f"{key}[{i}]"
        if not isinstance(group, (tuple, list)) or len(group) != 2 or not isinstance(group[0], str):
            raise ValueError(f"{where}={group!r} must be a (regex, options) pair")
        pattern, options = group
        try:
            re.compile(pattern)
        except re.error as e:
            raise ValueError(f"{where}: bad regex {pattern!r}: {e}") from None
        unknown = sorted(set(dict(options)) - set(GROUP_OPTIONS))
        if unknown:
            raise ValueError(f"{where}: unknown options {unknown}; known: {sorted(GROUP_OPTIONS)}")
        o = {**GROUP_OPTIONS, **dict(options)}
        if not float(o["lr_mult"]) >= 0:
            raise ValueError(f"{where}: lr_mult={o['lr_mult']!r} must be >= 0")
        if o["decay"] not in (None, True, False):
            raise ValueError(f"{where}: decay={o['decay']!r} must be None, True or False")
        if int(o["trainable_from"]) < 0 or (o["trainable_until"] is not None and int(o["trainable_until"]) < int(o["trainable_from"])):
            raise ValueError(f"{where}: need 0 <= trainable_from <= trainable_until, got {o['trainable_from']}, {o['trainable_until']}")


def group_options(groups: Sequence[tuple[str, Mapping[str, Any]]]) -> list[dict[str, Any]]:
    """Every group's options with the defaults filled in, in order."""
    return [{**GROUP_OPTIONS, **dict(options)} for _, options in groups]


def param_labels(params: PyTree, groups: Sequence[tuple[str, Mapping[str, Any]]]) -> PyTree:
    """Per parameter: 'group_<i>' of the first group whose regex matches its path, FROZEN_GROUP when that
    group is frozen for the run, or DEFAULT_GROUP when none matches."""
    options = group_options(groups)

    def label(path, _):
        name = path_str(path)
        for i, (pattern, _options) in enumerate(groups):
            if re.search(pattern, name):
                return FROZEN_GROUP if options[i]["frozen"] else f"group_{i}"
        return DEFAULT_GROUP

    return jax.tree_util.tree_map_with_path(label, params)


def frozen_mask(params: PyTree, groups: Sequence[tuple[str, Mapping[str, Any]]]) -> PyTree:
    """True for every parameter frozen for the whole run."""
    return jax.tree.map(lambda label: label == FROZEN_GROUP, param_labels(params, groups))


class WindowState(NamedTuple):
    count: jax.Array
    inner: Any


def trainable_window(inner: optax.GradientTransformation, start: int, end: int | None = None) -> optax.GradientTransformation:
    """Runs ``inner`` only for steps in [start, end); outside, updates are zero and inner state is kept."""

    def init(params):
        return WindowState(jnp.zeros([], jnp.int32), inner.init(params))

    def update(updates, state, params=None):
        new_updates, new_inner = inner.update(updates, state.inner, params)
        frozen = state.count < start
        if end is not None:
            frozen = frozen | (state.count >= end)
        new_updates = jax.tree.map(lambda u: jnp.where(frozen, jnp.zeros_like(u), u), new_updates)
        new_inner = jax.tree.map(lambda n, o: jnp.where(frozen, o, n), new_inner, state.inner)
        return new_updates, WindowState(state.count + 1, new_inner)

    return optax.GradientTransformation(init, update)


def first_moment_dtype(cfg: ml_collections.ConfigDict) -> jnp.dtype | None:
    """Dtype of Adam's first moment: None (the parameters' own, float32) unless ``cfg.mu_dtype`` is
    'bfloat16' (big_vision's option; the second moment has no knob and stays float32; a bf16 second moment or bf16 master weights cost accuracy, #41)."""
    name = cfg.get("mu_dtype", "float32")
    return None if name == "float32" else MOMENT_DTYPES[name]


def build_optimizer(
    cfg: ml_collections.ConfigDict, total_steps: int, groups: Sequence[tuple[str, Mapping[str, Any]]] = ()
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """Clipping, then per-group Adam + weight decay (+ lr multiplier, trainable window), then the schedule.

    ``groups`` are (param-path regex, options) pairs, first match wins (see ``GROUP_OPTIONS``). Without
    groups the chain is plain AdamW. Parameters frozen for the run get ``set_to_zero`` (no state).
    """
    schedule = learning_rate_schedule(cfg, total_steps)
    mu_dtype = first_moment_dtype(cfg)

    def adamw_direction(decay: bool | None = None, lr_mult: float = 1.0) -> optax.GradientTransformation:
        mask = decay_mask if decay is None else (lambda p: jax.tree.map(lambda _: bool(decay), p))
        parts = [optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, mu_dtype=mu_dtype),
                 optax.add_decayed_weights(cfg.weight_decay, mask=mask)]
        if float(lr_mult) != 1.0:
            parts.append(optax.scale(float(lr_mult)))
        return optax.chain(*parts)

    groups = list(groups)
    if groups:
        transforms = {DEFAULT_GROUP: adamw_direction(), FROZEN_GROUP: optax.set_to_zero()}
        for i, o in enumerate(group_options(groups)):
            inner = adamw_direction(o["decay"], o["lr_mult"])
            start, end = int(o["trainable_from"]), o["trainable_until"]
            transforms[f"group_{i}"] = inner if (start == 0 and end is None) else trainable_window(
                inner, start, None if end is None else int(end))
        direction = optax.multi_transform(transforms, lambda p: param_labels(p, groups))
    else:
        direction = adamw_direction()
    parts = []
    if cfg.get("grad_clip_norm"):
        parts.append(optax.clip_by_global_norm(cfg.grad_clip_norm))
    parts += [direction, optax.scale_by_learning_rate(schedule)]
    return optax.chain(*parts), schedule
