"""The scaling-vector Sinkhorn path: taken for cosine-like scores, equal to the log domain, and safely
replaced by the log domain when float32 cannot hold the kernel."""
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tolerances  # registered by tests/conftest.py
from jax.sharding import AxisType

from clus_jax.objectives.sinkhorn import _scaling_iterations, column_max, sharded_sinkhorn_knopp, sinkhorn_knopp


def cosines(rng, batch, protos, dim=16):
    z = rng.normal(size=(batch, dim))
    c = rng.normal(size=(protos, dim))
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    return (z @ c.T).astype(np.float32)


def fast_path_taken(scores, epsilon, num_iters=3):
    scores = jnp.asarray(scores, jnp.float32)
    return bool(jax.jit(lambda s: _scaling_iterations(s, epsilon, num_iters, None, None)[3])(scores))


def log_domain(scores, epsilon, num_iters):
    return jax.jit(partial(sinkhorn_knopp, epsilon=epsilon, num_iters=num_iters, fast=False))(scores)


def assert_same_codes(got, want, scores, epsilon, num_iters):
    """Two float32 evaluations (two paths, or two programs, or sharded and whole: other summation orders),
    each within ``tolerances.sinkhorn_codes_rtol`` of the exact codes."""
    rtol = tolerances.sinkhorn_codes_rtol(scores, epsilon, num_iters, evaluations=2)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=rtol, atol=tolerances.FLUSHED)


@pytest.mark.parametrize("batch,protos", [(1, 1), (2, 7), (5, 3), (17, 64), (33, 5), (64, 9), (256, 300), (1000, 7)])
def test_column_max_matches_max(batch, protos):
    x = np.random.default_rng(batch).normal(size=(batch, protos)).astype(np.float32)
    # A maximum rounds nothing, in any order: exact.
    np.testing.assert_array_equal(np.asarray(jax.jit(column_max)(x)), x.max(axis=0))


@pytest.mark.parametrize("batch,protos,epsilon,num_iters", [(64, 30, 0.05, 3), (33, 100, 0.03, 10), (7, 5, 0.1, 1),
                                                            (128, 3000, 0.05, 3), (300, 20, 0.02, 5)])
def test_fast_path_taken_and_equal_to_log_domain(batch, protos, epsilon, num_iters):
    scores = cosines(np.random.default_rng(batch), batch, protos)
    assert fast_path_taken(scores, epsilon, num_iters)
    fast = jax.jit(partial(sinkhorn_knopp, epsilon=epsilon, num_iters=num_iters))(scores)
    assert_same_codes(fast, log_domain(scores, epsilon, num_iters), scores, epsilon, num_iters)
    np.testing.assert_allclose(np.asarray(fast).sum(axis=1), 1.0, rtol=0, atol=tolerances.codes_row_sum_atol(protos))


def test_falls_back_when_a_sample_underflows():
    # Sample 0 scores far below every prototype's best sample: its kernel row is all zeros in float32.
    rng = np.random.default_rng(1)
    scores = cosines(rng, 32, 16)
    scores[0] = -50.0
    assert not fast_path_taken(scores, 0.05)
    codes = np.asarray(jax.jit(partial(sinkhorn_knopp, epsilon=0.05, num_iters=3))(scores))
    assert np.isfinite(codes).all()
    assert_same_codes(codes, log_domain(scores, 0.05, 3), scores, 0.05, 3)  # the same path in two programs


def test_falls_back_for_huge_logits_and_nonfinite_scores():
    rng = np.random.default_rng(2)
    scores = (3.0 * rng.uniform(-1, 1, (32, 16))).astype(np.float32)
    assert not fast_path_taken(scores, 0.01)
    bad = cosines(rng, 8, 4)
    bad[2, 1] = np.nan
    assert not fast_path_taken(bad, 0.05)


def test_sharded_fast_path_equals_single_device():
    rng = np.random.default_rng(3)
    scores = cosines(rng, 64, 48)
    mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)
    run = jax.jit(partial(sharded_sinkhorn_knopp, mesh=mesh, batch_axes=("data", "fsdp"), proto_axis="tensor",
                          epsilon=0.05, num_iters=3))
    single = jax.jit(partial(sinkhorn_knopp, epsilon=0.05, num_iters=3))(scores)
    assert_same_codes(run(scores), single, scores, 0.05, 3)
    # One shard's sample underflowing sends every shard down the log-domain path together.
    scores[5] = -50.0
    assert_same_codes(run(scores), log_domain(scores, 0.05, 3), scores, 0.05, 3)
