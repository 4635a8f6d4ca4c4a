"""Optimizer: schedule shape, weight-decay mask, and a trainable window by masking (moments and decay untouched)."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from clus_jax.objectives import prototypes
from clus_jax.train.optim import build_optimizer, decay_mask, learning_rate_schedule

import tolerances  # registered by tests/conftest.py


def optim_config(**kw):
    base = dict(lr=0.1, warmup_steps=4, schedule="cosine", final_lr_fraction=0.0, b1=0.9, b2=0.99, eps=1e-8,
                weight_decay=0.5, grad_clip_norm=0.0)
    base.update(kw)
    return ml_collections.ConfigDict(base)


def test_warmup_then_cosine():
    sched = learning_rate_schedule(optim_config(), total_steps=20)
    # float32 schedules: 0.05 and 0.1 are not representable (u relative) and a few roundings follow, each
    # within u = 6e-8 relative: 1e-6 is above 16 u. A wrong warmup or peak is off by 10% or more.
    np.testing.assert_allclose([sched(0), sched(2), sched(4)], [0.0, 0.05, 0.1], rtol=1e-6)
    # Half-way through the cosine part: lr/2; cos(pi/2) of float32 pi is 4e-8, plus a few roundings.
    np.testing.assert_allclose(sched(12), 0.05, rtol=1e-5)
    # lr/2 (1 + cos(pi)): float32 pi is within 9e-8 of pi, so 1 + cos is within u (a rounding) of 0: <= 3e-9.
    np.testing.assert_allclose(sched(20), 0.0, atol=1e-7)


def test_a_run_may_stop_before_its_schedule_ends():
    """optim.schedule_steps: the first 10 steps of a 20-step schedule, as MoDE's seed runs; 0 = total_steps."""
    longer = learning_rate_schedule(optim_config(schedule_steps=20), total_steps=10)
    full = learning_rate_schedule(optim_config(), total_steps=20)
    steps = np.arange(11)
    np.testing.assert_array_equal(jax.vmap(longer)(steps), jax.vmap(full)(steps))
    assert float(longer(10)) > 0.05  # half-way down the cosine, not at its end
    own = learning_rate_schedule(optim_config(schedule_steps=0), total_steps=10)
    np.testing.assert_allclose(own(10), 0.0, atol=1e-7)


def test_decay_mask_excludes_vectors_and_scalars():
    params = {"w": jnp.ones((3, 3)), "b": jnp.ones(3), "logit_scale": jnp.ones(()), "ln": {"scale": jnp.ones(3)}}
    assert decay_mask(params) == {"w": True, "b": False, "logit_scale": False, "ln": {"scale": False}}


def test_adamw_matches_optax_adamw():
    cfg = optim_config(warmup_steps=0, schedule="constant")
    tx, _ = build_optimizer(cfg, total_steps=10)
    ref = optax.adamw(0.1, b1=0.9, b2=0.99, eps=1e-8, weight_decay=0.5, mask=decay_mask)
    params = {"w": jnp.arange(6.0).reshape(2, 3), "b": jnp.ones(3)}
    s, r = tx.init(params), ref.init(params)
    p1 = p2 = params
    for i in range(3):
        g = jax.tree.map(lambda x: jnp.sin(x + i), p1)
        u1, s = tx.update(g, s, p1)
        u2, r = ref.update(g, r, p2)
        p1, p2 = optax.apply_updates(p1, u1), optax.apply_updates(p2, u2)
    # Elementwise float32 only (two optax chains, no sums): per step ~10 roundings of an update at most
    # lr (1 + wd |p|) and one of p + update (u |p|); 3 steps: 1.5e-6. A wrong b1, b2 or decay moves p >= 3e-4.
    p_max = max(float(np.max(np.abs(x))) for x in jax.tree.leaves(params))
    atol = 3 * tolerances.U32 * (10 * 0.1 * (1 + 0.5 * p_max) + p_max)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=atol), p1, p2)


def test_frozen_group_is_untouched_then_trains_like_a_fresh_adam():
    cfg = optim_config(warmup_steps=0, schedule="constant")
    tx, _ = build_optimizer(cfg, total_steps=10, groups=[(prototypes.PARAM_PATTERN, {"trainable_from": 3})])
    params = {prototypes.PARAMS_KEY: {"bank_0": jnp.ones((2, 2))}, "w": jnp.ones((2, 2))}
    state = tx.init(params)
    history = []
    for _ in range(5):
        grads = jax.tree.map(lambda x: jnp.full_like(x, 0.5), params)
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
        history.append(float(params[prototypes.PARAMS_KEY]["bank_0"][0, 0]))
    # Frozen for 3 steps: no update and no weight decay (decay alone would have moved it).
    assert history[:3] == [1.0, 1.0, 1.0]
    # Step 4 is the group's first Adam step: bias-corrected update = lr * (1 + wd * p) exactly (eps / |g| = 2e-8);
    # in float32 ~10 roundings of the 0.15 update and one of 0.85: ~2e-7 relative, 1e-5 is far above it.
    np.testing.assert_allclose(history[3], 1.0 - 0.1 * (1.0 + 0.5 * 1.0), rtol=1e-5)
    # The other group trained all along.
    assert float(params["w"][0, 0]) < history[3]
