"""Swapped-prediction loss against a float64 NumPy transcription of SwAV's two-view loss."""
import math
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tolerances  # registered by tests/conftest.py
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from clus_jax.objectives import cross_entropy_with_codes, swapped_prediction_loss
from swav_reference import log_softmax_numpy as log_softmax_np  # registered by tests/conftest.py
from swav_reference import swav_loss_grad_numpy as swav_loss_grad_np
from swav_reference import swav_loss_numpy as swav_loss_np
from swav_reference import swav_sinkhorn_numpy as swav_sinkhorn_np


def auto_mesh(shape, names):
    return jax.make_mesh(shape, names, axis_types=(AxisType.Auto,) * len(shape))


def paired_scores(rng, batch, protos, dim=16):
    """Cosine scores of two noisy views of the same samples against shared unit prototypes."""
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
    base = rng.normal(size=(batch, dim))
    protos_w = unit(rng.normal(size=(protos, dim)))
    z_a = unit(base + 0.5 * rng.normal(size=base.shape))
    z_b = unit(base + 0.5 * rng.normal(size=base.shape))
    return (z_a @ protos_w.T).astype(np.float32), (z_b @ protos_w.T).astype(np.float32)


def bounds(s_a, s_b, loss, temperature=0.1, epsilon=0.05, num_iters=3, codes_relative_error=None):
    """(loss atol, gradient atol) of one float32 evaluation against the exact values: tolerances.swap_loss_bounds,
    with Sinkhorn codes' relative error (tolerances.sinkhorn_codes_rtol) unless the codes are given."""
    both = np.maximum(np.abs(np.asarray(s_a, np.float32)), np.abs(np.asarray(s_b, np.float32)))
    if codes_relative_error is None:
        codes_relative_error = tolerances.sinkhorn_codes_rtol(both, epsilon, num_iters)
    return tolerances.swap_loss_bounds(both.shape[0], both.shape[1], temperature, float(both.max()), float(loss),
                                       codes_relative_error)


loss_and_grad = jax.jit(jax.value_and_grad(swapped_prediction_loss, argnums=(0, 1)),
                        static_argnames=("temperature", "epsilon", "num_iters"))


@pytest.mark.parametrize("batch,protos,temperature,epsilon,num_iters",
                         [(16, 8, 0.1, 0.05, 3), (40, 30, 0.1, 0.05, 3), (24, 12, 0.2, 0.03, 5)])
def test_loss_and_gradient_match_numpy_reference(batch, protos, temperature, epsilon, num_iters):
    rng = np.random.default_rng(batch + protos)
    s_a, s_b = paired_scores(rng, batch, protos)
    loss, (g_a, g_b) = loss_and_grad(s_a, s_b, temperature=temperature, epsilon=epsilon, num_iters=num_iters)
    want, q_a, q_b = swav_loss_np(s_a, s_b, temperature, epsilon, num_iters)
    want_a, want_b = swav_loss_grad_np(s_a, s_b, temperature, q_a, q_b)
    assert loss.dtype == jnp.float32 and loss.shape == ()
    loss_atol, grad_atol = bounds(s_a, s_b, want, temperature, epsilon, num_iters)
    np.testing.assert_allclose(float(loss), want, rtol=0, atol=loss_atol)
    np.testing.assert_allclose(np.asarray(g_a), want_a, rtol=0, atol=grad_atol)
    np.testing.assert_allclose(np.asarray(g_b), want_b, rtol=0, atol=grad_atol)
    # Codes off by an iteration, or p - q with a term dropped, move entries by a good part of the largest.
    assert grad_atol < 0.05 * float(np.abs(want_a).max()) and loss_atol < 1e-3 * want


def test_gradient_matches_finite_differences_with_fixed_codes():
    rng = np.random.default_rng(11)
    s_a, s_b = (x.astype(np.float64) for x in paired_scores(rng, 6, 5))
    q_a, q_b = swav_sinkhorn_np(s_a, 0.05, 3), swav_sinkhorn_np(s_b, 0.05, 3)
    g_a, _ = jax.grad(swapped_prediction_loss, argnums=(0, 1))(
        jnp.asarray(s_a, jnp.float32), jnp.asarray(s_b, jnp.float32),
        codes_a=jnp.asarray(q_a, jnp.float32), codes_b=jnp.asarray(q_b, jnp.float32))
    h = 1e-5
    fd = np.zeros_like(s_a)
    for idx in np.ndindex(*s_a.shape):
        plus, minus = s_a.copy(), s_a.copy()
        plus[idx] += h
        minus[idx] -= h
        fd[idx] = (swav_loss_np(plus, s_b, 0.1, 0.05, 3, q_a, q_b)[0]
                   - swav_loss_np(minus, s_b, 0.1, 0.05, 3, q_a, q_b)[0]) / (2 * h)
    # Float32 side: the codes rounded to float32 (u). Central differences: h^2 / 6 |d^3 f| <= 1e-10 * 1000 / 12,
    # and float64 roundoff 1e-16 |f| / h: both below 1e-9.
    _, grad_atol = bounds(s_a, s_b, 1.0, codes_relative_error=tolerances.U32)
    np.testing.assert_allclose(np.asarray(g_a), fd, rtol=0, atol=grad_atol + 1e-9)
    assert grad_atol < 0.05 * float(np.abs(fd).max())


def test_empty_axis_name_sequences_mean_unsharded():
    rng = np.random.default_rng(16)
    s_a, s_b = paired_scores(rng, 8, 6)
    plain = swapped_prediction_loss(s_a, s_b)
    empty = swapped_prediction_loss(s_a, s_b, batch_axis_name=(), proto_axis_name=[])
    assert float(empty) == float(plain)  # the same operations, one by one: exact


def test_uniform_scores_give_log_k():
    batch, protos = 8, 30
    scores = jnp.full((batch, protos), 0.3, jnp.float32)
    loss = swapped_prediction_loss(scores, scores)
    loss_atol, _ = bounds(scores, scores, math.log(protos))
    assert float(loss) == pytest.approx(math.log(protos), abs=loss_atol)


def test_given_codes_are_used_and_receive_no_gradient():
    rng = np.random.default_rng(12)
    batch, protos, queue = 12, 10, 36
    s_a, s_b = paired_scores(rng, batch, protos)
    queue_a, queue_b = paired_scores(rng, queue, protos)
    # Codes computed with queue rows prepended, then sliced to the current batch (SwAV's queue usage).
    q_a = swav_sinkhorn_np(np.concatenate([queue_a, s_a]), 0.05, 3)[-batch:]
    q_b = swav_sinkhorn_np(np.concatenate([queue_b, s_b]), 0.05, 3)[-batch:]
    codes_a, codes_b = jnp.asarray(q_a, jnp.float32), jnp.asarray(q_b, jnp.float32)
    loss = swapped_prediction_loss(s_a, s_b, codes_a=codes_a, codes_b=codes_b)
    want, _, _ = swav_loss_np(s_a, s_b, 0.1, 0.05, 3, q_a, q_b)
    loss_atol, _ = bounds(s_a, s_b, want, codes_relative_error=tolerances.U32)  # float64 codes rounded to float32
    np.testing.assert_allclose(float(loss), want, rtol=0, atol=loss_atol)
    assert abs(float(loss) - float(swapped_prediction_loss(s_a, s_b))) > 1e-4

    code_grad = jax.grad(lambda q: cross_entropy_with_codes(q, jnp.asarray(s_b), 0.1))(codes_a)
    np.testing.assert_array_equal(np.asarray(code_grad), 0.0)


def test_cross_entropy_with_codes_matches_numpy():
    rng = np.random.default_rng(13)
    scores = rng.normal(size=(10, 7)).astype(np.float32)
    codes = rng.dirichlet(np.ones(7), size=10).astype(np.float32)
    got = cross_entropy_with_codes(jnp.asarray(codes), jnp.asarray(scores), 0.2)
    want = -np.mean(np.sum(codes * log_softmax_np(scores / 0.2), axis=1))
    # One CE obeys the swapped loss's bound (the mean of its two CEs'); the reference has the same float32 codes.
    loss_atol, _ = bounds(scores, scores, want, temperature=0.2, codes_relative_error=0.0)
    np.testing.assert_allclose(float(got), want, rtol=0, atol=loss_atol)


def test_bfloat16_scores_are_computed_in_float32():
    rng = np.random.default_rng(14)
    s_a, s_b = (jnp.asarray(x, jnp.bfloat16) for x in paired_scores(rng, 16, 8))
    loss, (g_a, _) = loss_and_grad(s_a, s_b)
    assert loss.dtype == jnp.float32 and g_a.dtype == jnp.bfloat16
    up_a, up_b = s_a.astype(jnp.float32), s_b.astype(jnp.float32)
    want, _, _ = swav_loss_np(np.asarray(up_a), np.asarray(up_b), 0.1, 0.05, 3)
    loss_atol, _ = bounds(up_a, up_b, want)
    # Two compiled programs (the cast fused or not): two float32 evaluations, each within loss_atol.
    np.testing.assert_allclose(float(loss), float(loss_and_grad(up_a, up_b)[0]), rtol=0, atol=2 * loss_atol)
    np.testing.assert_allclose(float(loss), want, rtol=0, atol=loss_atol)


SHARDED_CASES = [
    ((8,), ("data",), "data", None),
    ((2, 2, 2), ("data", "fsdp", "tensor"), ("data", "fsdp"), "tensor"),
    ((4, 2), ("data", "tensor"), "data", "tensor"),
]


@pytest.mark.parametrize("shape,names,batch_axes,proto_axis", SHARDED_CASES)
def test_sharded_loss_and_gradient_equal_single_device(shape, names, batch_axes, proto_axis):
    rng = np.random.default_rng(15)
    s_a, s_b = paired_scores(rng, 32, 24)
    mesh = auto_mesh(shape, names)
    spec = P(batch_axes, proto_axis)
    # Axis names may also be given as a list (any sequence of mesh axis names).
    names_arg = list(batch_axes) if isinstance(batch_axes, tuple) else batch_axes
    sharded_loss = jax.shard_map(
        partial(swapped_prediction_loss, batch_axis_name=names_arg, proto_axis_name=proto_axis),
        mesh=mesh, in_specs=(spec, spec), out_specs=P())
    placed = [jax.device_put(x, NamedSharding(mesh, spec)) for x in (s_a, s_b)]
    loss, (g_a, g_b) = jax.jit(jax.value_and_grad(sharded_loss, argnums=(0, 1)))(*placed)
    want_loss, (want_a, want_b) = loss_and_grad(s_a, s_b)
    # Sharded sums run in another order: two float32 evaluations, each within the bounds of the exact values.
    loss_atol, grad_atol = bounds(s_a, s_b, want_loss)
    np.testing.assert_allclose(float(loss), float(want_loss), rtol=0, atol=2 * loss_atol)
    for got, want in ((g_a, want_a), (g_b, want_b)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=2 * grad_atol)
        assert 2 * grad_atol < 0.05 * float(jnp.abs(want).max())
    assert g_a.sharding.is_equivalent_to(NamedSharding(mesh, spec), 2)
