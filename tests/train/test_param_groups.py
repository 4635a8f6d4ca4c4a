"""Parameter groups through the real train step: lr_mult, decay on/off, trainable windows, frozen for the
run (no gradient, no optimizer state, bit-identical, a cheaper compiled step) and errors naming the entry.

The expected updates are computed by hand from the gradient the step gave the optimizer (recorded by a
pass-through first transformation): on a group's first Adam step the bias-corrected moments are g and g^2,
so the AdamW update is -lr * lr_mult * (g / (|g| + eps) + weight_decay * p * decayed).
"""
import re

import jax
import numpy as np
import optax
import pytest

from clus_jax.models import flops
from clus_jax.train.experiment import build
from clus_jax.objectives.registry import ConfigError
from clus_jax.train import optim

import tolerances  # registered by tests/conftest.py
import train_helpers as helpers  # registered by tests/conftest.py
from train_helpers import recording  # noqa: F401 (a pytest fixture)

LR, WD, EPS = 3e-3, 0.5, 1e-6


def group_config(groups, **overrides):
    """One device, constant lr, no clipping (so the update is a function of this step's gradient alone)."""
    config = helpers.tiny_config("clip", **{
        "mesh.data": 1, "model.text.vocab_size": 64, "optim.lr": LR, "optim.weight_decay": WD, "optim.eps": EPS,
        "optim.warmup_steps": 0, "optim.schedule": "constant", "optim.grad_clip_norm": 0.0, **overrides})
    config.param_groups = list(groups)
    return config


def run(config, steps):
    """Host states before each step and after the last, and the gradient of every step."""
    exp = build(config, jax.devices()[:1])
    state = exp.init_state()
    states, grads = [jax.device_get(state)], []
    for local in helpers.random_batches(config, steps, seed=5):
        state, metrics = exp.step(state, exp.global_batch(local))
        assert int(metrics["nonfinite"]) == 0
        host = jax.device_get(state)
        states.append(host)
        grads.append(host["opt_state"][0].grads)
    return exp, states, grads


def paths(tree):
    return {optim.path_str(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def first_adam_update(g, p, lr_mult, decayed):
    """AdamW's first step (moments start at zero), by hand, in float64."""
    g, p = np.asarray(g, np.float64), np.asarray(p, np.float64)
    return -LR * lr_mult * (g / (np.abs(g) + EPS) + (WD * p if decayed else 0.0))


def assert_update(name, before, after, expected):
    """float32 ``after - before`` against the float64 update. The update's ~12 roundings (moments, sqrt, eps,
    divide, decay, lr) are within 12 u = 7e-7 of it, at most 7x more where decay and the Adam step cancel
    (|wd p| <= 1.33): rtol 1e-4 is far above that, and far below a dropped decay term (wd |p| ~ 1% here) or a
    wrong lr_mult. ``p + update`` rounds by u |after| (the subtraction back is exact or within rtol): atol."""
    atol = tolerances.U32 * float(np.max(np.abs(after)))
    np.testing.assert_allclose(after - before, expected, rtol=1e-4, atol=atol, err_msg=name)


@pytest.mark.slow  # the fast tier trains the default groups; the other group knobs train in the slow tier
def test_lr_mult_and_decay(recording):
    groups = [(r"^image/", {"lr_mult": 5.0}), (r"^text/", {"decay": False}), (r"^logit_scale$", {"decay": True})]
    exp, states, grads = run(group_config(groups), 1)
    before, after, g = paths(states[0]["params"]), paths(states[1]["params"]), paths(grads[0])
    checked = set()
    for name, p in before.items():
        lr_mult = 5.0 if name.startswith("image/") else 1.0
        decayed = {"text": False, "logit_scale": True}.get(name.split("/")[0], p.ndim >= 2)
        assert_update(name, p, after[name], first_adam_update(g[name], p, lr_mult, decayed))
        checked.add((lr_mult, decayed))
    assert checked == {(5.0, True), (5.0, False), (1.0, True), (1.0, False)}
    # Not vacuous: the 5x group moves about 5 lr per entry, the others about 1 lr.
    qkv = "image/encoder/block_0/attn/qkv_kernel"
    assert np.max(np.abs(after[qkv] - before[qkv])) > 4 * LR
    text_qkv = "text/encoder/block_0/attn/qkv_kernel"
    assert np.max(np.abs(after[text_qkv] - before[text_qkv])) < 1.01 * LR  # no decay on top of the Adam step
    assert np.abs(after["logit_scale"] - before["logit_scale"]) > LR  # decayed: Adam step + lr * wd * 2.66


def test_the_default_groups_train_the_text_tower_at_three_hundredths(recording):
    """config_base's default param_groups, read by the real step: text/ and text_proj/ move 0.03 lr per entry on
    the first Adam step, image/, image_proj/ and the logit scale a full lr."""
    from clus_jax.config import base as config_base

    default = list(config_base.base_config().param_groups)
    assert default == [(r"^text(_proj)?/", {"lr_mult": 0.03})]
    exp, states, grads = run(group_config(default), 1)
    before, after, g = paths(states[0]["params"]), paths(states[1]["params"]), paths(grads[0])
    seen = set()
    for name, p in before.items():
        lr_mult = 0.03 if name.startswith(("text/", "text_proj/")) else 1.0
        assert_update(name, p, after[name], first_adam_update(g[name], p, lr_mult, p.ndim >= 2))
        seen.add((name.split("/")[0], lr_mult))
    assert {("text", 0.03), ("text_proj", 0.03), ("image", 1.0), ("image_proj", 1.0)} <= seen


@pytest.mark.slow
def test_trainable_window(recording):
    """Frozen before step 1 and from step 3: no update, no decay, moments untouched; step 1 is a first Adam step."""
    groups = [(r"^image/", {"trainable_from": 1, "trainable_until": 3})]
    exp, states, grads = run(group_config(groups), 4)
    p = [paths(s["params"]) for s in states]
    image = [n for n in p[0] if n.startswith("image/")]
    others = [n for n in p[0] if not n.startswith("image/") and n != "logit_scale"]
    for step, frozen in ((0, True), (1, False), (2, False), (3, True)):
        for name in image:
            if frozen:  # no update at all: bitwise
                np.testing.assert_array_equal(p[step + 1][name], p[step][name], err_msg=f"step {step} {name}")
            else:
                assert np.any(p[step + 1][name] != p[step][name]), f"step {step} {name}"
        assert all(np.any(p[step + 1][n] != p[step][n]) for n in others)  # the rest trains all along
    # The window's first step is a fresh Adam step on that step's gradient.
    g1 = paths(grads[1])
    for name in image:
        assert_update(name, p[1][name], p[2][name], first_adam_update(g1[name], p[1][name], 1.0, p[1][name].ndim >= 2))
    # Before the window the group's Adam moments stayed zero.
    moments = {optim.path_str(k): np.asarray(x) for k, x in jax.tree_util.tree_leaves_with_path(states[1]["opt_state"])}
    window = [v for k, v in moments.items() if "group_0" in k and "image" in k and v.dtype == np.float32]
    assert window and all(np.all(v == 0) for v in window)


@pytest.mark.slow
def test_frozen_for_the_run(recording):
    frozen = [(r"^text(_proj)?/", {"frozen": True})]
    exp, states, _ = run(group_config(frozen), 2)
    # No optimizer state for the frozen leaves: MaskedNode in every group's moments, EmptyState for the group.
    opt_paths = [optim.path_str(k) for k, _ in jax.tree_util.tree_leaves_with_path(states[-1]["opt_state"][1:])]
    assert not [k for k in opt_paths if "/text/" in k or "/text_proj/" in k]
    assert [k for k in opt_paths if "/image/" in k]
    partition = states[-1]["opt_state"][1][0]  # (clip-free chain) -> multi_transform state
    assert jax.tree.leaves(partition.inner_states[optim.FROZEN_GROUP]) == []
    assert isinstance(partition.inner_states[optim.FROZEN_GROUP].inner_state, optax.EmptyState)
    # Bit-identical after two steps; the image tower trained.
    before, after = states[0]["params"], states[-1]["params"]
    for key in ("text", "text_proj"):  # never updated: bitwise
        for a, b in zip(jax.tree.leaves(after[key]), jax.tree.leaves(before[key])):
            np.testing.assert_array_equal(a, b)
    assert any(np.any(a != b) for a, b in zip(jax.tree.leaves(after["image"]), jax.tree.leaves(before["image"])))

    # The compiled step does less: the text tower's backward pass is not built.
    def compiled(exp):
        c = exp.step.jitted.lower(exp.abstract_state, exp.abstract_batch()).compile()
        cost = c.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        return cost["flops"], c.memory_analysis().temp_size_in_bytes

    trainable = build(group_config([]), jax.devices()[:1])
    frozen_flops, frozen_temp = compiled(exp)
    trainable_flops, trainable_temp = compiled(trainable)
    parts = flops.forward_flops_per_example(exp.config.model, causal_attention_factor=1.0)
    text_backward = 2 * exp.config.batch_size * sum(v for k, v in parts.items() if k.startswith("text_"))
    assert trainable_flops - frozen_flops > 0.5 * text_backward, (trainable_flops, frozen_flops, text_backward)
    assert frozen_temp < trainable_temp, (frozen_temp, trainable_temp)


@pytest.mark.parametrize("groups,index,message", [
    ([(r"^image/", {"lr_mult": 2.0}), (r"^text/", {"lr_multiplier": 2.0})], 1, "unknown options"),
    ([("(", {})], 0, "bad regex"),
    ([(r"^image/", {"lr_mult": -1.0})], 0, "lr_mult"),
    ([(r"^image/", {"trainable_from": 5, "trainable_until": 2})], 0, "trainable_from <= trainable_until"),
    ([(r"^image/", {"decay": "yes"})], 0, "decay"),
    ([(r"^image/", {}), r"^text/"], 1, "pair"),
])
def test_bad_group_fails_in_build_naming_the_entry(groups, index, message):
    with pytest.raises(ConfigError, match=re.escape(f"config.param_groups[{index}]") + ".*" + re.escape(message)):
        build(group_config(groups), jax.devices()[:1])
