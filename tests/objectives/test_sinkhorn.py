"""Sinkhorn-Knopp codes against a float64 NumPy transcription of SwAV's ``distributed_sinkhorn``."""
import math
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tolerances  # registered by tests/conftest.py
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from clus_jax.objectives import sharded_sinkhorn_knopp, sinkhorn_knopp
from clus_jax.parallel.collectives import distributed_logsumexp
from swav_reference import logdomain_sinkhorn_numpy as logdomain_sinkhorn_np  # registered by tests/conftest.py
from swav_reference import swav_sinkhorn_numpy as swav_sinkhorn_np


def auto_mesh(shape, names):
    return jax.make_mesh(shape, names, axis_types=(AxisType.Auto,) * len(shape))


def random_scores(rng, batch, protos, scale=1.0):
    return (scale * rng.uniform(-1.0, 1.0, (batch, protos))).astype(np.float32)


jit_sinkhorn = jax.jit(sinkhorn_knopp, static_argnames=("epsilon", "num_iters"))


codes_rtol = tolerances.sinkhorn_codes_rtol  # per float32 evaluation: see tests/tolerances.py
row_sum_atol = tolerances.codes_row_sum_atol
FLUSH = tolerances.FLUSHED


@pytest.mark.parametrize(
    "batch,protos,epsilon,num_iters",
    [(16, 8, 0.05, 3), (64, 30, 0.05, 3), (7, 5, 0.1, 1), (33, 100, 0.03, 10), (40, 12, 0.05, 0), (128, 300, 0.05, 3)],
)
def test_matches_swav_reference(batch, protos, epsilon, num_iters):
    rng = np.random.default_rng(batch * protos + num_iters)
    scores = random_scores(rng, batch, protos)
    codes = jit_sinkhorn(scores, epsilon=epsilon, num_iters=num_iters)
    expected = swav_sinkhorn_np(scores, epsilon, num_iters)
    assert codes.dtype == jnp.float32 and codes.shape == (batch, protos)
    rtol = codes_rtol(scores, epsilon, num_iters)
    np.testing.assert_allclose(np.asarray(codes), expected, rtol=rtol, atol=FLUSH)
    assert rtol < 2e-3  # an iteration more or less, or a wrong epsilon, moves codes by percents
    if num_iters > 0:
        np.testing.assert_allclose(np.asarray(codes).sum(axis=1), 1.0, rtol=0, atol=row_sum_atol(protos))


def test_prototype_marginals_converge_to_b_over_k():
    rng = np.random.default_rng(1)
    batch, protos = 48, 12
    scores = random_scores(rng, batch, protos)
    few = np.asarray(jit_sinkhorn(scores, epsilon=0.1, num_iters=3))
    many = np.asarray(jit_sinkhorn(scores, epsilon=0.1, num_iters=200))
    np.testing.assert_allclose(many.sum(axis=1), 1.0, rtol=0, atol=row_sum_atol(protos))
    # Convergence, not rounding, sets 1e-4: one float32 normalisation moves a marginal by ~gamma(48) = 3e-6.
    np.testing.assert_allclose(many.sum(axis=0), batch / protos, rtol=1e-4)
    # Three rounds end on a sample normalisation: rows exact, prototype marginals not yet.
    assert np.abs(few.sum(axis=0) - batch / protos).max() > 1e-3
    # The bound adds up 399 normalisations' rounding (about 6e-3); the converged codes agree far better.
    np.testing.assert_allclose(many, swav_sinkhorn_np(scores, 0.1, 200), rtol=codes_rtol(scores, 0.1, 200), atol=FLUSH)


@pytest.mark.parametrize("epsilon", [1.0, 0.05])
def test_hand_computed_two_by_two(epsilon):
    # Kernel exp(s / eps) = E = [[1, 3], [1, 1]] (rows: samples, columns: prototypes), B = K = 2.
    # 0 rounds: E / sum(E) * B = [[1, 3], [1, 1]] / 6 * 2 = [[1/3, 1], [1/3, 1/3]].
    # Round 1, per prototype: column sums (2, 4) -> [[1/2, 3/4], [1/2, 1/4]] / K = [[1/4, 3/8], [1/4, 1/8]];
    #   per sample: row sums 5/8 and 3/8 -> codes [[2/5, 3/5], [2/3, 1/3]] (after * B).
    # Round 2, from Q = [[1/5, 3/10], [1/3, 1/6]]: column sums 8/15 and 7/15 -> [[3/8, 9/14], [5/8, 5/14]] / K;
    #   per sample: [3/8, 9/14] ~ [21, 36] -> [7/19, 12/19];  [5/8, 5/14] ~ [35, 20] -> [7/11, 4/11].
    scores = epsilon * np.log(np.array([[1.0, 3.0], [1.0, 1.0]], np.float32))
    expected = {
        0: [[1 / 3, 1.0], [1 / 3, 1 / 3]],
        1: [[2 / 5, 3 / 5], [2 / 3, 1 / 3]],
        2: [[7 / 19, 12 / 19], [7 / 11, 4 / 11]],
    }
    for num_iters, want in expected.items():
        got = sinkhorn_knopp(jnp.asarray(scores), epsilon=epsilon, num_iters=num_iters)
        # The scores carry float32 log and product roundings (2u of |s|) besides the algorithm's own.
        rtol = codes_rtol(scores, epsilon, num_iters, score_atol=2 * tolerances.U32 * float(np.abs(scores).max()))
        np.testing.assert_allclose(np.asarray(got), np.array(want), rtol=rtol)


def test_stable_where_plain_exp_overflows():
    rng = np.random.default_rng(2)
    epsilon = 0.01
    scores = random_scores(rng, 32, 16, scale=3.0)  # logits up to +-300
    with np.errstate(over="ignore"):
        assert np.isinf(np.exp(scores / np.float32(epsilon))).any()
    codes = np.asarray(jit_sinkhorn(scores, epsilon=epsilon, num_iters=3))
    assert np.isfinite(codes).all()
    np.testing.assert_allclose(codes.sum(axis=1), 1.0, rtol=0, atol=row_sum_atol(16))
    expected = swav_sinkhorn_np(scores, epsilon, 3, max_shift=True)
    assert np.isfinite(expected).all()
    np.testing.assert_allclose(codes, expected, rtol=codes_rtol(scores, epsilon, 3), atol=FLUSH)


def test_stable_where_float64_exp_underflows():
    rng = np.random.default_rng(3)
    epsilon = 0.01
    scores = random_scores(rng, 32, 16, scale=50.0)  # logits up to +-5000
    codes = np.asarray(jit_sinkhorn(scores, epsilon=epsilon, num_iters=3))
    assert np.isfinite(codes).all()
    np.testing.assert_allclose(codes.sum(axis=1), 1.0, rtol=0, atol=row_sum_atol(16))
    # Logits up to 5000 round by ~3e-4 each, and the potentials as much: a relative bound of a few percent.
    rtol = codes_rtol(scores, epsilon, 3)
    np.testing.assert_allclose(codes, logdomain_sinkhorn_np(scores, epsilon, 3), rtol=rtol, atol=FLUSH)
    assert rtol < 0.1


def test_bfloat16_input_gives_float32_codes():
    rng = np.random.default_rng(4)
    scores = jnp.asarray(random_scores(rng, 24, 10), jnp.bfloat16)
    codes = jit_sinkhorn(scores, epsilon=0.05, num_iters=3)
    assert codes.dtype == jnp.float32
    upcast = scores.astype(jnp.float32)
    # Two compiled programs (the cast fused or not): two float32 evaluations, each within the bound.
    np.testing.assert_allclose(np.asarray(codes), np.asarray(jit_sinkhorn(upcast, epsilon=0.05, num_iters=3)),
                               rtol=codes_rtol(upcast, 0.05, 3, evaluations=2), atol=FLUSH)
    np.testing.assert_allclose(np.asarray(codes), swav_sinkhorn_np(np.asarray(upcast), 0.05, 3),
                               rtol=codes_rtol(upcast, 0.05, 3), atol=FLUSH)


def test_no_gradient_through_codes():
    rng = np.random.default_rng(5)
    scores = jnp.asarray(random_scores(rng, 12, 6))
    weights = jnp.asarray(rng.normal(size=(12, 6)), jnp.float32)
    grad = jax.grad(lambda s: jnp.sum(sinkhorn_knopp(s) * weights) + jnp.sum(sinkhorn_knopp(s) ** 2))(scores)
    np.testing.assert_array_equal(np.asarray(grad), 0.0)


def test_distributed_logsumexp_matches_numpy_and_handles_neg_inf():
    x = np.array([[1000.0, 999.0, -np.inf], [-np.inf, -np.inf, -np.inf]], np.float32)
    got = np.asarray(distributed_logsumexp(jnp.asarray(x), axis=1))
    # Two terms (no order to differ): rounding the float32 result, half an ulp of 1000, is 3e-8 relative.
    assert got[0, 0] == pytest.approx(1000.0 + math.log1p(math.exp(-1.0)), rel=1e-7)
    assert got[1, 0] == -np.inf


SHARDED_CASES = [
    # mesh shape, mesh axis names, batch axes, prototype axis
    ((8,), ("data",), "data", None),
    ((2, 2, 2), ("data", "fsdp", "tensor"), ("data", "fsdp"), "tensor"),
    ((4, 2), ("data", "tensor"), "data", "tensor"),
    ((2, 2, 2), ("data", "fsdp", "tensor"), ("data", "fsdp", "tensor"), None),
]


@pytest.mark.parametrize("shape,names,batch_axes,proto_axis", SHARDED_CASES)
def test_sharded_equals_single_device(shape, names, batch_axes, proto_axis):
    rng = np.random.default_rng(6)
    scores = random_scores(rng, 32, 24)
    mesh = auto_mesh(shape, names)
    run = jax.jit(partial(sharded_sinkhorn_knopp, mesh=mesh, batch_axes=batch_axes, proto_axis=proto_axis,
                          epsilon=0.05, num_iters=3))
    codes = run(scores)
    assert codes.sharding.is_equivalent_to(NamedSharding(mesh, P(batch_axes, proto_axis)), 2)
    single = jit_sinkhorn(scores, epsilon=0.05, num_iters=3)
    # Sharded sums run in another order: two float32 evaluations, each within the bound of the exact codes.
    np.testing.assert_allclose(np.asarray(codes), np.asarray(single), rtol=codes_rtol(scores, 0.05, 3, 2), atol=FLUSH)
    np.testing.assert_allclose(np.asarray(codes), swav_sinkhorn_np(scores, 0.05, 3), rtol=codes_rtol(scores, 0.05, 3),
                               atol=FLUSH)


def test_sharded_with_default_explicit_mesh_and_zero_iters():
    rng = np.random.default_rng(7)
    scores = random_scores(rng, 16, 8)
    mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"))
    for num_iters in (0, 2):
        codes = sharded_sinkhorn_knopp(scores, mesh, proto_axis="tensor", num_iters=num_iters)
        np.testing.assert_allclose(np.asarray(codes), swav_sinkhorn_np(scores, 0.05, num_iters),
                                   rtol=codes_rtol(scores, 0.05, num_iters), atol=FLUSH)
