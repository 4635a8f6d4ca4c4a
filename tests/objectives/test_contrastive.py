"""CLIP, SigLIP and CLIP+Reg against float64 NumPy transcriptions of open_clip's ClipLoss / SigLipLoss.

The references (``tests/objectives/open_clip_reference.py``) are written from the published formulas and
the gradients are derived by hand, so none of them calls the code under test.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tolerances  # registered by tests/conftest.py
from jax.sharding import Mesh, PartitionSpec as P

from clus_jax.objectives import clip_loss, clip_reg_loss, positive_pair_l2, siglip_loss
from open_clip_reference import clip_loss_grads_numpy as ref_clip_grads  # registered by tests/conftest.py
from open_clip_reference import clip_loss_numpy as ref_clip
from open_clip_reference import siglip_loss_grads_numpy as ref_siglip_grads
from open_clip_reference import siglip_loss_numpy as ref_siglip

jax.config.update("jax_enable_x64", False)


def normalised(rng, b, d):
    x = rng.normal(size=(b, d))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


U = tolerances.U32


clip_bounds = tolerances.clip_loss_bounds  # one float32 evaluation against the exact value: tests/tolerances.py
siglip_bounds = tolerances.siglip_loss_bounds


def l2_bounds(b, d, l2, grad_max, rounded_inputs=True):
    """(value atol, gradient atol) of one float32 evaluation of mean_i |x_i - y_i|^2 against the exact value: the
    b*d non-negative squares sum with gamma(b d), the difference, square and mean round by u each; float64
    inputs rounded to float32 move the differences by u (|x| + |y|), at most 4u sqrt(l2) in the mean (Cauchy-
    Schwarz, unit rows). Gradient ``2 (x - y) / B`` elementwise: three roundings of at most grad_max."""
    value_atol = (tolerances.gamma(b * d) + 3 * U) * l2 + (4 * U * np.sqrt(l2) if rounded_inputs else 0.0)
    return value_atol, 3 * U * grad_max


CASES = [(2, 4, 1.0), (8, 16, 14.3), (32, 8, 100.0), (64, 32, 50.0)]


@pytest.mark.parametrize("b,d,scale", CASES)
def test_clip_loss_matches_reference(b, d, scale):
    rng = np.random.default_rng(b)
    img, txt = normalised(rng, b, d), normalised(rng, b, d)
    got = clip_loss(jnp.float32(img), jnp.float32(txt), jnp.float32(scale))
    want = ref_clip(img, txt, scale)
    loss_atol, grad_atol = clip_bounds(b, d, scale, want)
    np.testing.assert_allclose(got, want, rtol=0, atol=loss_atol)
    g_img, g_txt = jax.grad(lambda a, c: clip_loss(a, c, scale), argnums=(0, 1))(jnp.float32(img), jnp.float32(txt))
    r_img, r_txt = ref_clip_grads(img, txt, scale)
    np.testing.assert_allclose(g_img, r_img, rtol=0, atol=grad_atol)
    np.testing.assert_allclose(g_txt, r_txt, rtol=0, atol=grad_atol)
    # A dropped direction or term, or a wrong scale, moves the gradient by a good part of its size.
    assert grad_atol < 0.05 * float(np.abs(r_img).max()) and loss_atol < 0.01 * want


@pytest.mark.parametrize("b,d,scale", CASES)
def test_siglip_loss_matches_reference(b, d, scale):
    rng = np.random.default_rng(100 + b)
    img, txt = normalised(rng, b, d), normalised(rng, b, d)
    bias = -10.0 if scale > 10 else -1.0
    got = siglip_loss(jnp.float32(img), jnp.float32(txt), jnp.float32(scale), jnp.float32(bias))
    want = ref_siglip(img, txt, scale, bias)
    loss_atol, grad_atol = siglip_bounds(b, d, scale, bias, want)
    np.testing.assert_allclose(got, want, rtol=0, atol=loss_atol)
    g_img, g_txt = jax.grad(lambda a, c: siglip_loss(a, c, scale, bias), argnums=(0, 1))(jnp.float32(img), jnp.float32(txt))
    r_img, r_txt = ref_siglip_grads(img, txt, scale, bias)
    np.testing.assert_allclose(g_img, r_img, rtol=0, atol=grad_atol)
    np.testing.assert_allclose(g_txt, r_txt, rtol=0, atol=grad_atol)
    assert grad_atol < 0.05 * float(np.abs(r_img).max()) and loss_atol < 0.01 * want


def test_clip_loss_hand_computed():
    """B=2, orthogonal pairs: logits diag = s, off-diag = 0 -> loss = log(1 + e^-s)."""
    img = jnp.eye(2, dtype=jnp.float32)
    want = np.log1p(np.exp(-3.0))
    np.testing.assert_allclose(clip_loss(img, img, 3.0), want, rtol=0, atol=clip_bounds(2, 2, 3.0, want, False)[0])


def test_clip_reg_adds_positive_pair_l2_only():
    rng = np.random.default_rng(7)
    img, txt = normalised(rng, 16, 8), normalised(rng, 16, 8)
    l2 = np.mean(np.sum((img - txt) ** 2, axis=1))
    l2_atol, _ = l2_bounds(16, 8, l2, 0.0)
    got_l2 = positive_pair_l2(jnp.float32(img), jnp.float32(txt))
    np.testing.assert_allclose(got_l2, l2, rtol=0, atol=l2_atol)
    np.testing.assert_allclose(got_l2, np.mean(2 - 2 * np.sum(img * txt, 1)), rtol=0, atol=l2_atol)
    got = clip_reg_loss(jnp.float32(img), jnp.float32(txt), 10.0, 0.5)
    clip_want = ref_clip(img, txt, 10.0)
    clip_atol = clip_bounds(16, 8, 10.0, clip_want)[0]
    want = clip_want + 0.5 * l2
    np.testing.assert_allclose(got, want, rtol=0, atol=clip_atol + 0.5 * l2_atol + 2 * U * want)  # + scale, add
    # The regulariser ignores negatives: permuting the non-matching rows changes CLIP but not the L2 term.
    perm = np.r_[0, 1, np.arange(2, 16)[::-1]]
    permuted = positive_pair_l2(jnp.float32(img[perm]), jnp.float32(txt[perm]))
    np.testing.assert_allclose(permuted, l2, rtol=0, atol=l2_atol)


MESHES = [((8, 1, 1), ("data",)), ((4, 2, 1), ("data", "fsdp")), ((2, 1, 4), ("data",)), ((2, 2, 2), ("data", "fsdp"))]


@pytest.mark.parametrize("shape,axes", MESHES)
def test_sharded_losses_equal_single_device(shape, axes):
    mesh = Mesh(np.array(jax.devices()).reshape(shape), ("data", "fsdp", "tensor"))
    rng = np.random.default_rng(3)
    img, txt = jnp.float32(normalised(rng, 32, 16)), jnp.float32(normalised(rng, 32, 16))
    spec = P(axes)

    def sharded(fn, *extra):
        return jax.jit(jax.shard_map(lambda a, b: fn(a, b, *extra, axis_name=axes), mesh=mesh, in_specs=(spec, spec), out_specs=P()))

    def bounds(fn, value, g_max):
        """One float32 evaluation's (value, gradient) bounds, on the same float32 inputs."""
        l2_atol, l2_grad_atol = l2_bounds(32, 16, float(positive_pair_l2(img, txt)),
                                          2 * float(jnp.abs(img - txt).max()) / 32, rounded_inputs=False)
        clip_atol, clip_grad_atol = clip_bounds(32, 16, 20.0, float(clip_loss(img, txt, 20.0)), rounded_inputs=False)
        if fn is clip_loss:
            return clip_atol, clip_grad_atol
        if fn is siglip_loss:
            return siglip_bounds(32, 16, 10.0, -5.0, value, rounded_inputs=False)
        if fn is clip_reg_loss:  # CLIP's, 0.3 L2's, and the scaling's and the addition's roundings
            return clip_atol + 0.3 * l2_atol + 2 * U * value, clip_grad_atol + 0.3 * l2_grad_atol + 2 * U * g_max
        return l2_atol, l2_grad_atol

    for fn, extra in ((clip_loss, (20.0,)), (siglip_loss, (10.0, -5.0)), (clip_reg_loss, (20.0, 0.3)), (positive_pair_l2, ())):
        single = fn(img, txt, *extra)
        g_single = jax.grad(lambda a: fn(a, txt, *extra))(img)
        g_sharded = jax.grad(lambda a: sharded(fn, *extra)(a, txt))(img)
        # Sharded sums run in another order: two float32 evaluations, each within the bounds of the exact values.
        value_atol, grad_atol = bounds(fn, float(single), float(jnp.abs(g_single).max()))
        np.testing.assert_allclose(sharded(fn, *extra)(img, txt), single, rtol=0, atol=2 * value_atol)
        np.testing.assert_allclose(g_sharded, g_single, rtol=0, atol=2 * grad_atol)
        assert 2 * grad_atol < 0.05 * float(jnp.abs(g_single).max())


def test_sharded_clip_materialises_only_local_rows():
    """The compiled per-device program holds [B/n, B] logits, never [B, B]."""
    n, b, d = 8, 256, 16
    mesh = Mesh(np.array(jax.devices()).reshape(n, 1, 1), ("data", "fsdp", "tensor"))
    fn = jax.jit(jax.shard_map(lambda a, c: clip_loss(a, c, 10.0, axis_name=("data",)), mesh=mesh,
                               in_specs=(P("data"), P("data")), out_specs=P()))
    x = jax.ShapeDtypeStruct((b, d), jnp.float32)
    hlo = fn.lower(x, x).compile().as_text()
    assert f"f32[{b // n},{b}]" in hlo
    assert f"f32[{b},{b}]" not in hlo
