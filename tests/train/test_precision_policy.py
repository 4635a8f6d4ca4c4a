"""Mixed precision: ``model.dtype = 'bfloat16'`` computes the towers in bfloat16 while parameters and Adam's
second moment stay float32 (the first moment too, unless ``optim.mu_dtype = 'bfloat16'``), the losses are
float32, and a short bf16 run tracks the float32 run's loss curve step by step."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from clus_jax.train.experiment import build
from clus_jax.objectives.registry import ConfigError

import train_helpers as helpers  # registered by tests/conftest.py

STEPS = 12


def adam_states(opt_state):
    is_adam = lambda x: isinstance(x, optax.ScaleByAdamState)  # noqa: E731
    return [x for x in jax.tree.leaves(opt_state, is_leaf=is_adam) if is_adam(x)]


def dtypes(tree):
    return {jnp.dtype(x.dtype) for x in jax.tree.leaves(tree)}


@pytest.mark.parametrize("mu_dtype", ["float32", "bfloat16"])
def test_master_weights_and_moments(mu_dtype):
    config = helpers.tiny_config("clip", **{"model.dtype": "bfloat16", "optim.mu_dtype": mu_dtype})
    state = build(config, jax.devices()[:1]).abstract_state
    assert dtypes(state["params"]) == {jnp.dtype(jnp.float32)}
    (adam,) = adam_states(state["opt_state"])
    assert dtypes(adam.nu) == {jnp.dtype(jnp.float32)}
    assert dtypes(adam.mu) == {jnp.dtype(mu_dtype)}


def test_mu_dtype_validated():
    config = helpers.tiny_config("clip", **{"optim.mu_dtype": "float16"})
    with pytest.raises(ConfigError, match=r"config\.optim\.mu_dtype='float16'"):
        build(config, jax.devices()[:1])


def train(dtype, batches):
    config = helpers.tiny_config("clip", **{"model.dtype": dtype, "total_steps": STEPS, "optim.warmup_steps": 2})
    exp = build(config, jax.devices()[:1])
    state, losses = exp.init_state(), []
    hlo = exp.step.jitted.lower(state, exp.global_batch(batches[0])).as_text()
    for t in range(STEPS):
        state, metrics = exp.step(state, exp.global_batch(batches[t]))
        assert metrics["loss"].dtype == jnp.float32
        losses.append(float(metrics["loss"]))
    return np.array(losses), jax.device_get(state), hlo


@pytest.mark.slow
def test_bfloat16_run_tracks_float32():
    batches = helpers.random_batches(helpers.tiny_config("clip"), STEPS)
    f32, _, f32_hlo = train("float32", batches)
    bf16, state, bf16_hlo = train("bfloat16", batches)
    assert "bf16" not in f32_hlo and "bf16" in bf16_hlo  # the towers really compute in bfloat16 ...
    assert not np.array_equal(f32, bf16)
    assert f32.max() > 1.2 * f32.min(), f32  # a curve worth tracking (on random pairs it settles near log B)
    # ... and every step's loss is within 5%: bfloat16 rounds each layer's inputs and outputs (u = 2**-8 =
    # 0.4%; products accumulate in float32), a few roundings in each of 3 layers and 12 steps on top: ~12 u.
    np.testing.assert_allclose(bf16, f32, rtol=0.05)
    assert dtypes(state["params"]) == {jnp.dtype(jnp.float32)}  # trained state: float32 masters and moments
    (adam,) = adam_states(state["opt_state"])
    assert dtypes(adam.mu) == dtypes(adam.nu) == {jnp.dtype(jnp.float32)}
