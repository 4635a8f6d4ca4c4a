"""The public losses compute in the caller's precision: float64 in (``jax_enable_x64``), float64 math.

Each of ``clip_loss``, ``siglip_loss``, ``sinkhorn_knopp`` and ``swapped_prediction_loss`` matches the float64
NumPy transcriptions of open_clip's ``ClipLoss``/``SigLipLoss`` and SwAV's ``distributed_sinkhorn`` and
swapped prediction (``open_clip_reference``, ``swav_reference``) to 1e-9 relative, on one device and sharded
over 8 devices; a float32 computation is off by 1e-8 to 1e-6. bfloat16 and float32 inputs still compute
in float32 (the floor), also with x64 enabled. x64 is switched on per test (``jax.enable_x64``), so the
other tests of the process are unaffected.
"""
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tolerances  # registered by tests/conftest.py
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from clus_jax.objectives import (
    clip_loss,
    clip_reg_loss,
    sharded_sinkhorn_knopp,
    siglip_loss,
    sinkhorn_knopp,
    swapped_prediction_loss,
)
from clus_jax.objectives.sinkhorn import _scaling_iterations
from open_clip_reference import clip_loss_grads_numpy, clip_loss_numpy  # registered by tests/conftest.py
from open_clip_reference import siglip_loss_grads_numpy, siglip_loss_numpy
from swav_reference import logdomain_sinkhorn_numpy, swav_loss_grad_numpy, swav_loss_numpy, swav_sinkhorn_numpy

# Float64 against float64: the rounding bounds of tests/tolerances.py with u = 2^-53 are below 1e-10 relative for
# every case here (Sinkhorn's 10 rounds at epsilon 0.03: 3e-12); 1e-9 is far above them, far below float32's u.
RTOL = 1e-9


@pytest.fixture(autouse=True)
def x64():
    with jax.enable_x64(True):
        yield


def unit(rng, n, d):
    x = rng.normal(size=(n, d))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def cosines(rng, batch, protos, dim=16):
    return unit(rng, batch, dim) @ unit(rng, protos, dim).T


def paired_scores(rng, batch, protos, dim=16):
    """Cosine scores of two noisy views of the same samples against shared unit prototypes (float64)."""
    base, bank = rng.normal(size=(batch, dim)), unit(rng, protos, dim)
    views = [base + 0.5 * rng.normal(size=base.shape) for _ in range(2)]
    return [(v / np.linalg.norm(v, axis=1, keepdims=True)) @ bank.T for v in views]


def assert_close(got, want, rtol=RTOL):
    """Relative to the largest entry (gradient entries may cancel to nearly zero)."""
    want = np.asarray(want, np.float64)
    np.testing.assert_allclose(np.asarray(got), want, rtol=rtol, atol=rtol * float(np.abs(want).max()))


def mesh(shape, names):
    return jax.make_mesh(shape, names, axis_types=(AxisType.Auto,) * len(shape))


CONTRASTIVE_CASES = [(2, 4, 1.0, None), (8, 16, 14.3, None), (32, 8, 100.0, None), (64, 32, 50.0, None),
                     (32, 8, 100.0, 5), (64, 32, 50.0, 24)]


@pytest.mark.parametrize("b,d,scale,chunk", CONTRASTIVE_CASES)
def test_clip_loss_float64(b, d, scale, chunk):
    rng = np.random.default_rng(b + d)
    img, txt = unit(rng, b, d), unit(rng, b, d)
    fn = jax.jit(jax.value_and_grad(partial(clip_loss, logit_scale=scale, chunk_size=chunk), argnums=(0, 1)))
    loss, (g_img, g_txt) = fn(jnp.asarray(img), jnp.asarray(txt))
    assert loss.dtype == jnp.float64 and g_img.dtype == jnp.float64
    np.testing.assert_allclose(float(loss), clip_loss_numpy(img, txt, scale), rtol=RTOL)
    want_img, want_txt = clip_loss_grads_numpy(img, txt, scale)
    assert_close(g_img, want_img)
    assert_close(g_txt, want_txt)


@pytest.mark.parametrize("b,d,scale,chunk", CONTRASTIVE_CASES)
def test_siglip_loss_float64(b, d, scale, chunk):
    rng = np.random.default_rng(100 + b + d)
    img, txt = unit(rng, b, d), unit(rng, b, d)
    bias = -10.0 if scale > 10 else -1.0
    fn = jax.jit(jax.value_and_grad(partial(siglip_loss, logit_scale=jnp.float64(scale), logit_bias=jnp.float64(bias),
                                            chunk_size=chunk), argnums=(0, 1)))
    loss, (g_img, g_txt) = fn(jnp.asarray(img), jnp.asarray(txt))
    assert loss.dtype == jnp.float64
    np.testing.assert_allclose(float(loss), siglip_loss_numpy(img, txt, scale, bias), rtol=RTOL)
    want_img, want_txt = siglip_loss_grads_numpy(img, txt, scale, bias)
    assert_close(g_img, want_img)
    assert_close(g_txt, want_txt)


def test_clip_reg_loss_float64():
    rng = np.random.default_rng(7)
    img, txt = unit(rng, 16, 8), unit(rng, 16, 8)
    l2 = np.mean(np.sum((img - txt) ** 2, axis=1))
    got = clip_reg_loss(jnp.asarray(img), jnp.asarray(txt), 10.0, 0.5)
    assert got.dtype == jnp.float64
    np.testing.assert_allclose(float(got), clip_loss_numpy(img, txt, 10.0) + 0.5 * l2, rtol=RTOL)


CONTRASTIVE_MESHES = [((8, 1, 1), ("data",)), ((4, 2, 1), ("data", "fsdp")), ((2, 2, 2), ("data", "fsdp"))]


@pytest.mark.parametrize("shape,axes", CONTRASTIVE_MESHES)
@pytest.mark.parametrize("chunk", [None, 12])
def test_sharded_contrastive_float64(shape, axes, chunk):
    m = mesh(shape, ("data", "fsdp", "tensor"))
    rng = np.random.default_rng(3)
    img, txt = unit(rng, 32, 16), unit(rng, 32, 16)
    losses = [(partial(clip_loss, logit_scale=20.0), clip_loss_numpy(img, txt, 20.0)),
              (partial(siglip_loss, logit_scale=10.0, logit_bias=-5.0), siglip_loss_numpy(img, txt, 10.0, -5.0))]
    for fn, want in losses:
        sharded = jax.jit(jax.shard_map(lambda a, b, fn=fn: fn(a, b, axis_name=axes, chunk_size=chunk), mesh=m,
                                        in_specs=(P(axes), P(axes)), out_specs=P()))
        got = sharded(jnp.asarray(img), jnp.asarray(txt))
        assert got.dtype == jnp.float64
        np.testing.assert_allclose(float(got), want, rtol=RTOL)


def fast_path_taken(scores, epsilon, num_iters):
    return bool(jax.jit(lambda s: _scaling_iterations(s, epsilon, num_iters, None, None)[3])(jnp.asarray(scores)))


SINKHORN_CASES = [(16, 8, 0.05, 3), (64, 30, 0.05, 3), (7, 5, 0.1, 1), (33, 100, 0.03, 10), (40, 12, 0.05, 0),
                  (128, 300, 0.05, 3)]


@pytest.mark.parametrize("batch,protos,epsilon,num_iters", SINKHORN_CASES)
@pytest.mark.parametrize("fast", [True, False])
def test_sinkhorn_knopp_float64(batch, protos, epsilon, num_iters, fast):
    scores = cosines(np.random.default_rng(batch * protos + num_iters), batch, protos)
    if fast and num_iters:
        assert fast_path_taken(scores, epsilon, num_iters)
    codes = jax.jit(partial(sinkhorn_knopp, epsilon=epsilon, num_iters=num_iters, fast=fast))(jnp.asarray(scores))
    assert codes.dtype == jnp.float64
    np.testing.assert_allclose(np.asarray(codes), swav_sinkhorn_numpy(scores, epsilon, num_iters), rtol=RTOL, atol=0)


def test_sinkhorn_fast_path_uses_float64_range():
    """A sample whose float32 kernel row is flushed to zero is fine in float64: the fast path stays on."""
    rng = np.random.default_rng(1)
    scores = cosines(rng, 32, 16)
    scores[0] = -3.0  # exp(-80) relative to the best sample: below float32's range, inside float64's
    assert not fast_path_taken(scores.astype(np.float32), 0.05, 3)
    assert fast_path_taken(scores, 0.05, 3)
    codes = jax.jit(partial(sinkhorn_knopp, epsilon=0.05, num_iters=3))(jnp.asarray(scores))
    np.testing.assert_allclose(np.asarray(codes), swav_sinkhorn_numpy(scores, 0.05, 3), rtol=RTOL, atol=0)


def test_sinkhorn_log_domain_fallback_float64():
    """A kernel row that underflows even float64 sends the codes to the log domain, still at float64 accuracy."""
    rng = np.random.default_rng(2)
    scores = cosines(rng, 32, 16)
    scores[0] = -50.0  # exp(-1000): below float64's range
    assert not fast_path_taken(scores, 0.05, 3)
    codes = jax.jit(partial(sinkhorn_knopp, epsilon=0.05, num_iters=3))(jnp.asarray(scores))
    assert codes.dtype == jnp.float64
    np.testing.assert_allclose(np.asarray(codes), logdomain_sinkhorn_numpy(scores, 0.05, 3), rtol=RTOL, atol=0)


SINKHORN_MESHES = [((8,), ("data",), "data", None), ((2, 2, 2), ("data", "fsdp", "tensor"), ("data", "fsdp"), "tensor"),
                   ((4, 2), ("data", "tensor"), "data", "tensor")]


@pytest.mark.parametrize("shape,names,batch_axes,proto_axis", SINKHORN_MESHES)
def test_sharded_sinkhorn_float64(shape, names, batch_axes, proto_axis):
    scores = cosines(np.random.default_rng(6), 32, 24)
    run = jax.jit(partial(sharded_sinkhorn_knopp, mesh=mesh(shape, names), batch_axes=batch_axes,
                          proto_axis=proto_axis, epsilon=0.05, num_iters=3))
    for fast_ok in (True, False):
        if not fast_ok:
            scores[5] = -50.0  # one shard's underflowing sample sends every shard to the log domain
        codes = run(jnp.asarray(scores))
        assert codes.dtype == jnp.float64
        want = (swav_sinkhorn_numpy if fast_ok else logdomain_sinkhorn_numpy)(scores, 0.05, 3)
        np.testing.assert_allclose(np.asarray(codes), want, rtol=RTOL, atol=0)


swap_value_and_grad = jax.jit(jax.value_and_grad(swapped_prediction_loss, argnums=(0, 1)),
                              static_argnames=("temperature", "epsilon", "num_iters"))


@pytest.mark.parametrize("batch,protos,temperature,epsilon,num_iters",
                         [(16, 8, 0.1, 0.05, 3), (40, 30, 0.1, 0.05, 3), (24, 12, 0.2, 0.03, 5), (64, 100, 0.1, 0.05, 3)])
def test_swapped_prediction_loss_float64(batch, protos, temperature, epsilon, num_iters):
    s_a, s_b = paired_scores(np.random.default_rng(batch + protos), batch, protos)
    loss, (g_a, g_b) = swap_value_and_grad(jnp.asarray(s_a), jnp.asarray(s_b), temperature=temperature,
                                           epsilon=epsilon, num_iters=num_iters)
    want, q_a, q_b = swav_loss_numpy(s_a, s_b, temperature, epsilon, num_iters)
    assert loss.dtype == jnp.float64 and g_a.dtype == jnp.float64
    np.testing.assert_allclose(float(loss), want, rtol=RTOL)
    want_a, want_b = swav_loss_grad_numpy(s_a, s_b, temperature, q_a, q_b)
    assert_close(g_a, want_a)
    assert_close(g_b, want_b)


@pytest.mark.parametrize("shape,names,batch_axes,proto_axis", SINKHORN_MESHES)
def test_sharded_swapped_prediction_loss_float64(shape, names, batch_axes, proto_axis):
    s_a, s_b = paired_scores(np.random.default_rng(15), 32, 24)
    m, spec = mesh(shape, names), P(batch_axes, proto_axis)
    fn = jax.shard_map(partial(swapped_prediction_loss, batch_axis_name=batch_axes, proto_axis_name=proto_axis),
                       mesh=m, in_specs=(spec, spec), out_specs=P())
    placed = [jax.device_put(jnp.asarray(x), NamedSharding(m, spec)) for x in (s_a, s_b)]
    loss, (g_a, g_b) = jax.jit(jax.value_and_grad(fn, argnums=(0, 1)))(*placed)
    want, q_a, q_b = swav_loss_numpy(s_a, s_b, 0.1, 0.05, 3)
    assert loss.dtype == jnp.float64
    np.testing.assert_allclose(float(loss), want, rtol=RTOL)
    want_a, want_b = swav_loss_grad_numpy(s_a, s_b, 0.1, q_a, q_b)
    assert_close(g_a, want_a)
    assert_close(g_b, want_b)


def float32_floor_cases(rng):
    """(name, loss, its float64 NumPy reference, float64 inputs, tolerance): ``tolerance(xs, want, n)`` is the
    (rtol, atol) of float32 values from inputs ``xs`` against the exact ``want`` (n=1) or against another float32
    evaluation (n=2)."""
    img, txt = unit(rng, 16, 8), unit(rng, 16, 8)
    s_a, s_b = paired_scores(rng, 16, 12)

    def contrastive(bounds, *args):
        # bfloat16 rows have norms up to 1 + 2^-8: the bounds' |x||y| <= 1 holds for the logit scale times that.
        def tol(xs, want, n):
            norms = max(float(np.linalg.norm(x, axis=1).max()) for x in xs) ** 2
            return 0.0, n * bounds(16, 8, args[0] * norms, *args[1:], float(want), rounded_inputs=False)[0]
        return tol

    def sinkhorn_tol(xs, want, n):
        return tolerances.sinkhorn_codes_rtol(xs[0], 0.05, 3, evaluations=n), tolerances.FLUSHED

    def swap_tol(xs, want, n):
        both = np.maximum(np.abs(xs[0]), np.abs(xs[1]))
        codes = tolerances.sinkhorn_codes_rtol(both, 0.05, 3)
        return 0.0, n * tolerances.swap_loss_bounds(16, 12, 0.1, float(both.max()), float(want), codes)[0]

    return [
        ("clip", lambda a, b: clip_loss(a, b, 20.0), lambda a, b: clip_loss_numpy(a, b, 20.0), (img, txt),
         contrastive(tolerances.clip_loss_bounds, 20.0)),
        ("siglip", lambda a, b: siglip_loss(a, b, 10.0, -5.0), lambda a, b: siglip_loss_numpy(a, b, 10.0, -5.0),
         (img, txt), contrastive(tolerances.siglip_loss_bounds, 10.0, -5.0)),
        ("sinkhorn", sinkhorn_knopp, lambda s: swav_sinkhorn_numpy(s, 0.05, 3), (s_a,), sinkhorn_tol),
        ("swap", swapped_prediction_loss, lambda a, b: swav_loss_numpy(a, b, 0.1, 0.05, 3)[0], (s_a, s_b), swap_tol),
    ]


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
def test_narrow_inputs_compute_at_the_float32_floor(dtype):
    """With x64 on, bfloat16/float16/float32 inputs give float32 results, equal to float32 math on the same
    values and float32-accurate against the float64 reference of those values."""
    for name, loss, reference, inputs, tolerance in float32_floor_cases(np.random.default_rng(4)):
        narrow = [jnp.asarray(x, dtype) for x in inputs]
        upcast = [x.astype(jnp.float32) for x in narrow]
        got = jax.jit(loss)(*narrow)
        assert got.dtype == jnp.float32, name
        want = reference(*[np.asarray(x, np.float64) for x in upcast])
        xs = [np.asarray(x, np.float64) for x in upcast]
        rtol, atol = tolerance(xs, want, 1)
        np.testing.assert_allclose(np.asarray(got), want, rtol=rtol, atol=atol, err_msg=name)
        # Two compiled programs (the cast fused or not): two float32 evaluations, each within the bound above.
        rtol, atol = tolerance(xs, want, 2)
        other = np.asarray(jax.jit(loss)(*upcast))
        np.testing.assert_allclose(np.asarray(got), other, rtol=rtol, atol=atol, err_msg=name)
