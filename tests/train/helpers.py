"""Shared test helpers: a tiny config, random batches, recorded gradients and the tolerances of two train
steps of one config in different summation orders (imported by the train tests)."""
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from clus_jax.config import base as config_base
from clus_jax.train import optim


def tiny_config(objective: str = "clip", **overrides):
    c = config_base.base_config()
    c.objectives = {objective: 1.0}
    c.batch_size = 16
    c.total_steps = 10
    # The mechanism tests' tower: plain patches, one learning rate (the default stem and slow text tower
    # are tested where they matter: tests/models/test_conv_stem.py, tests/test_configs.py).
    c.model.image.update(dict(size="mu", image_size=16, patch_size=4, conv_stem=()))
    c.param_groups = []
    # The full CLIP vocabulary: the synthetic source's captions go through the real tokenizer.
    c.model.text.update(dict(size="mu", context_length=8, vocab_size=49408))
    c.model.embed_dim = 32
    c.optim.warmup_steps = 2
    c.optim.lr = 3e-3
    c.data.source = "synthetic"
    c.evals.run = "none"
    if objective == "siglip":
        c.model.logit_bias_init = -10.0
        c.model.logit_scale_init = float(np.log(10.0))
    for key, value in overrides.items():
        node = c
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return c


def random_batches(config, n, seed=0):
    rng = np.random.default_rng(seed)
    b, s, t = config.batch_size, config.model.image.image_size, config.model.text.context_length
    out = []
    for _ in range(n):
        text = rng.integers(1, config.model.text.vocab_size, (b, t)).astype(np.int32)
        text[:, rng.integers(3, t) :] = 0
        out.append({"image": rng.integers(0, 256, (b, s, s, 3), dtype=np.uint8), "text": text})
    return out


class Recorded(NamedTuple):
    grads: Any


def record_gradients() -> optax.GradientTransformation:
    """A pass-through transformation that keeps this step's raw gradients in its state."""
    return optax.GradientTransformation(
        lambda params: Recorded(jax.tree.map(jnp.zeros_like, params)),
        lambda updates, state, params=None: (updates, Recorded(updates)),
    )


@pytest.fixture
def recording(monkeypatch):
    """``experiment.build`` puts ``record_gradients`` in front of the real optimizer: ``opt_state[0].grads``.

    Use it by importing it into a test module: ``from train_helpers import recording``.
    """
    real = optim.build_optimizer

    def build_optimizer(cfg, total_steps, groups=()):
        tx, schedule = real(cfg, total_steps, groups)
        return optax.chain(record_gradients(), tx), schedule

    monkeypatch.setattr(optim, "build_optimizer", build_optimizer)


# -- tolerances for two train steps of one config in different summation orders ---------------------------


def _tolerances():
    import tolerances  # registered by tests/conftest.py after this module

    return tolerances


# A mesh, micro-batches or a chunked loss reorder the sums of the tiny config's step; tolerances.network_atol
# with the 'mu' towers' 2 blocks + embedding + loss (4 layers, 8 for a gradient: forward and backward) and its
# longest reduction, a weight gradient's sum over 16 images x 17 tokens (the MLP sums 256).
FORWARD_DEPTH, GRAD_DEPTH = 4, 8
LONGEST_REDUCTION = 16 * 17
# Adam's direction g / (|g| + eps) turns a gradient difference d into up to 2 d / eps (2 lr where |g| < d):
# the default eps 1e-6 would let last-bit differences of near-zero gradients move parameters by ~lr. Tests that
# compare parameters or teachers after a step use this eps, so the bound below stays far below one step.
ADAM_EPS = 1e-3


def loss_atol(loss, n=LONGEST_REDUCTION):
    """network_atol for a loss value: ~1e-4 of it."""
    return _tolerances().network_atol(n, abs(float(loss)), FORWARD_DEPTH)


def grad_atol(leaf, n=LONGEST_REDUCTION):
    """network_atol for a gradient leaf, ~3e-4 of its largest entry (a leaf that is exactly 0: of 1)."""
    return _tolerances().network_atol(n, float(np.max(np.abs(leaf))) or 1.0, GRAD_DEPTH)


def global_norm(tree):
    return float(np.sqrt(sum(np.sum(np.square(np.asarray(x, np.float64))) for x in jax.tree.leaves(tree))))


def norm_rtol(tree):
    """Relative error of a float32 global norm: each leaf's squares summed (at most its size), then the leaves'
    sums, all positive terms: gamma(largest + leaves + 1) of the sum of squares, halved by the sqrt, plus u."""
    leaves = jax.tree.leaves(tree)
    return _tolerances().gamma(max(np.size(x) for x in leaves) + len(leaves) + 1) / 2 + _tolerances().U32


def grad_norm_atol(grads, n=LONGEST_REDUCTION):
    """|norm(a) - norm(b)| <= ||a - b|| (each leaf within grad_atol) plus both norms' own rounding."""
    diff = np.sqrt(sum(np.size(x) * grad_atol(x, n) ** 2 for x in jax.tree.leaves(grads)))
    return float(diff) + 2 * norm_rtol(grads) * global_norm(grads)


def updated_params_atol(grads, params_after, optim_cfg, n=LONGEST_REDUCTION):
    """Per entry of ``params_after`` (arrays like its leaves): |a - b| for one Adam step, among the first two,
    from the same parameters and moments, on gradients within ``grad_atol`` of ``grads``.

    Clipping scales g by k = min(1, clip / ||g||), alike in both up to the norms' relative difference
    (grad_norm_atol / ||g||), so k g moves by k d with d = grad_atol + that * |g|. Adam's direction
    r = m^ / (sqrt(v^) + eps) has |r| <= r_max (Cauchy-Schwarz over the two steps' gradients) and
    |dr/dg| <= (1 + r_max) / (c |g| + eps) with sqrt(v^) >= c |g|, c = 1 / sqrt(1 + b2): so r moves by at
    most min(2 r_max, (1 + r_max) k d / (c k max(|g| - d, 0) + eps)), about d / |g| where |g| >> eps / k and
    up to a full step only where |g| is within d of 0. lr (times a group's lr_mult <= 1) times that, plus ~10
    roundings of an update at most lr (1 + |p|) and one of p + update (u |p|).
    """
    u = _tolerances().U32
    lr, eps, b1, b2 = float(optim_cfg.lr), float(optim_cfg.eps), float(optim_cfg.b1), float(optim_cfg.b2)
    norm = global_norm(grads)
    k = min(1.0, float(optim_cfg.grad_clip_norm) / norm) if optim_cfg.get("grad_clip_norm") else 1.0
    norm_rel = grad_norm_atol(grads, n) / norm
    r_max = max(1.0, np.sqrt(1 + b1**2 / b2) * np.sqrt(1 + b2) / (1 + b1))
    c = 1 / np.sqrt(1 + b2)
    out = []
    for g, p in zip(jax.tree.leaves(grads), jax.tree.leaves(params_after)):
        g, p = np.abs(np.asarray(g, np.float64)), np.abs(np.asarray(p, np.float64))
        d = grad_atol(g, n) + norm_rel * g
        moved = np.minimum(2 * r_max, (1 + r_max) * k * d / (c * k * np.maximum(g - d, 0.0) + eps))
        out.append(lr * moved + u * (10 * lr * (1 + p) + p))
    return out


def assert_within(got, want, atol, err_msg=""):
    """|got - want| <= atol entry by entry (``atol`` an array like ``want``)."""
    diff = np.abs(np.asarray(got, np.float64) - np.asarray(want, np.float64))
    bad = diff > atol
    if np.any(bad):
        i = np.unravel_index(np.argmax(np.where(bad, diff / atol, 0.0)), diff.shape)
        raise AssertionError(f"{err_msg}: {int(bad.sum())} / {bad.size} entries beyond their tolerance; worst at "
                             f"{i}: got {np.asarray(got)[i]}, want {np.asarray(want)[i]}, atol {np.asarray(atol)[i]}")


def _path_keys(path):
    return tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def assert_states_close(got, want, params_atol, params_after, what):
    """Objective states after a step: a leaf that copies a parameter (an EMA teacher, momentum towers, found by
    the longest common path suffix and the same shape) within that parameter's ``params_atol`` entry by entry
    (the EMA weighs it by 1 - m <= 1) plus a few roundings; other float leaves (queued embeddings, computed at
    the same parameters) within network_atol of a forward pass; integers exactly."""
    params = [(_path_keys(path), np.shape(x), atol)
              for (path, x), atol in zip(jax.tree_util.tree_leaves_with_path(params_after), params_atol)]
    assert jax.tree.structure(got) == jax.tree.structure(want), what
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
        a, b, keys = np.asarray(a), np.asarray(b), _path_keys(path)
        where = f"{what}{jax.tree_util.keystr(path)}"
        if not np.issubdtype(b.dtype, np.floating):
            np.testing.assert_array_equal(a, b, err_msg=where)  # pointers and counters
            continue
        scale = float(np.max(np.abs(b))) if b.size else 0.0

        def common(p):
            k = 0
            while k < min(len(p), len(keys)) and p[-1 - k] == keys[-1 - k]:
                k += 1
            return k

        matches = [(common(p), i) for i, (p, shape, _) in enumerate(params) if shape == b.shape and common(p) > 0]
        if matches:
            atol = params[max(matches)[1]][2] + 4 * _tolerances().U32 * np.abs(b)
            assert_within(a, b, atol, err_msg=where)
        else:
            atol = _tolerances().network_atol(LONGEST_REDUCTION, scale, FORWARD_DEPTH)
            np.testing.assert_allclose(a, b, rtol=0, atol=atol, err_msg=where)
