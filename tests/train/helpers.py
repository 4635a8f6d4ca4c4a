"""Shared test helpers: a tiny config and random batches (imported by the train tests)."""
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from clus_jax import config_base
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
    c.evals.sets = "none"
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
