"""Chunked CLIP / SigLIP: same value and gradients as unchunked, and never a [b_local, B] logit block."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tolerances  # registered by tests/conftest.py
from jax.sharding import Mesh, PartitionSpec as P

from clus_jax.config import base as config_base
from clus_jax.objectives import clip_loss, clip_reg_loss, registry, siglip_loss


def normalised(rng, b, d):
    x = rng.normal(size=(b, d))
    return jnp.float32(x / np.linalg.norm(x, axis=1, keepdims=True))


LOSSES = [
    ("clip", lambda a, b, **kw: clip_loss(a, b, 30.0, **kw)),
    ("siglip", lambda a, b, **kw: siglip_loss(a, b, 10.0, -5.0, **kw)),
    ("clip_reg", lambda a, b, **kw: clip_reg_loss(a, b, 30.0, 0.3, **kw)),
]
LOGIT_SCALE = {"clip": 30.0, "siglip": 10.0, "clip_reg": 30.0}


def bounds(name, batch, dim, loss, u=tolerances.U32):
    """(value atol, gradient atol) for two summation orders of the same loss on unit-norm rows (|Y| <= 1).

    Gradient terms: the symmetric softmax cross-entropy's coordinate sums ``s / 2B * (P_ij - delta_ij) Y_jk``
    over j in each direction, at most ``2 s / B`` in absolute value together; SigLIP's sums
    ``s / B * sigmoid(.) Y_jk`` over B columns, at most ``s``; CLIP+Reg adds ``2 reg / B * (x - y)``,
    elementwise, at most ``4 reg / B``. Value: CLIP is a mean over 2B rows (weights add up to 1), SigLIP a sum
    of B*B pair terms over B (weights add up to B). See tests/tolerances.py for the per-term errors.
    """
    s = LOGIT_SCALE[name]
    term_sum = {"clip": 2 * s / batch, "siglip": s, "clip_reg": 2 * s / batch + 4 * 0.3 / batch}[name]
    weight_sum, n_terms = (batch, batch * batch) if name == "siglip" else (1.0, 2 * batch)
    # CLIP+Reg adds reg * mean ‖x - y‖² <= 4 reg to the loss scale.
    value = tolerances.logit_loss_atol(abs(float(loss)) + 4 * 0.3, batch, dim, s, weight_sum, n_terms, u=u)
    return value, tolerances.logit_grad_atol(term_sum, batch, dim, s, u=u)


def assert_chunked_matches(name, fn, chunk, img, txt, u=tolerances.U32):
    want = fn(img, txt)
    value_atol, grad_atol = bounds(name, img.shape[0], img.shape[1], want, u)
    got = jax.jit(lambda a, b: fn(a, b, chunk_size=chunk))(img, txt)
    np.testing.assert_allclose(got, want, rtol=0, atol=value_atol)
    g_want = jax.grad(lambda a, b: fn(a, b), argnums=(0, 1))(img, txt)
    g_got = jax.jit(jax.grad(lambda a, b: fn(a, b, chunk_size=chunk), argnums=(0, 1)))(img, txt)
    for w, g in zip(g_want, g_got):
        np.testing.assert_allclose(g, w, rtol=0, atol=grad_atol)
        # A chunking bug (a chunk dropped or counted twice) moves the gradient by about its own size.
        assert grad_atol < 0.05 * float(np.max(np.abs(w)))


@pytest.mark.parametrize("name,fn", LOSSES)
@pytest.mark.parametrize("chunk", [1, 5, 16, 31])
def test_chunked_equals_unchunked_single_device(name, fn, chunk):
    rng = np.random.default_rng(chunk)
    assert_chunked_matches(name, fn, chunk, normalised(rng, 32, 16), normalised(rng, 32, 16))


@pytest.mark.parametrize("seed", range(10))
def test_chunked_clip_holds_with_inputs_perturbed_at_the_last_bit(seed):
    """The case that failed on an AVX2 host (chunk 5, one gradient element 1.19e-7 off against atol 1e-7):
    moving half of the inputs by one ulp changes which last bits flip; the derived bound holds for all."""
    rng = np.random.default_rng(5)
    img, txt = normalised(rng, 32, 16), normalised(rng, 32, 16)
    perturb = np.random.default_rng(1000 + seed)
    img = jnp.asarray(tolerances.perturb_last_bit(np.asarray(img), perturb))
    txt = jnp.asarray(tolerances.perturb_last_bit(np.asarray(txt), perturb))
    assert_chunked_matches("clip", dict(LOSSES)["clip"], 5, img, txt)


@pytest.mark.parametrize("name,fn", LOSSES)
def test_chunked_equals_unchunked_in_float64(name, fn):
    """Chunking is exact algebra: in float64 the two agree to the float64 bound (about 1e-13 here)."""
    with jax.enable_x64(True):
        rng = np.random.default_rng(7)
        x, y = rng.normal(size=(32, 16)), rng.normal(size=(32, 16))
        img = jnp.asarray(x / np.linalg.norm(x, axis=1, keepdims=True))
        txt = jnp.asarray(y / np.linalg.norm(y, axis=1, keepdims=True))
        assert img.dtype == jnp.float64
        assert_chunked_matches(name, fn, 5, img, txt, u=tolerances.U64)


def test_chunk_size_zero_or_at_least_batch_is_unchunked():
    rng = np.random.default_rng(0)
    img, txt = normalised(rng, 8, 4), normalised(rng, 8, 4)
    for chunk in (None, 0, 8, 100):
        assert float(clip_loss(img, txt, 10.0, chunk_size=chunk)) == float(clip_loss(img, txt, 10.0))


@pytest.mark.parametrize("name,fn", LOSSES)
def test_chunked_sharded_equals_single_device(name, fn):
    mesh = Mesh(np.array(jax.devices()).reshape(4, 2, 1), ("data", "fsdp", "tensor"))
    axes = ("data", "fsdp")
    rng = np.random.default_rng(5)
    img, txt = normalised(rng, 64, 16), normalised(rng, 64, 16)
    sharded = jax.jit(jax.shard_map(lambda a, b: fn(a, b, axis_name=axes, chunk_size=24), mesh=mesh,
                                    in_specs=(P(axes), P(axes)), out_specs=P()))
    want = fn(img, txt)
    value_atol, grad_atol = bounds(name, 64, 16, want)  # the gathers reorder the same sums, nothing more
    np.testing.assert_allclose(sharded(img, txt), want, rtol=0, atol=value_atol)
    g_single = jax.grad(lambda a: fn(a, txt))(img)
    g_sharded = jax.grad(lambda a: sharded(a, txt))(img)
    np.testing.assert_allclose(g_sharded, g_single, rtol=0, atol=grad_atol)


@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_chunked_holds_only_chunk_columns(loss):
    """Forward and backward of the compiled per-device program: [b_local, chunk] blocks, no [b_local, B]."""
    n, b, d, chunk = 8, 1024, 16, 64
    mesh = Mesh(np.array(jax.devices()).reshape(n, 1, 1), ("data", "fsdp", "tensor"))
    fn = dict(LOSSES)[loss]

    def value_and_grads(a, c):
        mapped = jax.shard_map(lambda x, y: fn(x, y, axis_name=("data",), chunk_size=chunk), mesh=mesh,
                               in_specs=(P("data"), P("data")), out_specs=P())
        return jax.value_and_grad(lambda x, y: mapped(x, y), argnums=(0, 1))(a, c)

    x = jax.ShapeDtypeStruct((b, d), jnp.float32)
    hlo = jax.jit(value_and_grads).lower(x, x).compile().as_text()
    assert f"f32[{b // n},{chunk}]" in hlo
    assert f"f32[{b // n},{b}]" not in hlo and f"f32[{b},{b // n}]" not in hlo


def test_objective_knob_reaches_the_loss_and_is_validated():
    c = config_base.base_config()
    assert c.clip.chunk_size == 0 and c.siglip.chunk_size == 0 and c.clip_reg.chunk_size == 0
    c.clip.chunk_size = -1
    with pytest.raises(registry.ConfigError, match="config.clip.chunk_size"):
        registry.get("clip").validate(c)
    c.clip.chunk_size = 4
    registry.get("clip").validate(c)
