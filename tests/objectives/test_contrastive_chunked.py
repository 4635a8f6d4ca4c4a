"""Chunked CLIP / SigLIP: same value and gradients as unchunked, and never a [b_local, B] logit block."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec as P

from clus_jax import config_base
from clus_jax.objectives import clip_loss, clip_reg_loss, registry, siglip_loss


def normalised(rng, b, d):
    x = rng.normal(size=(b, d))
    return jnp.float32(x / np.linalg.norm(x, axis=1, keepdims=True))


LOSSES = [
    ("clip", lambda a, b, **kw: clip_loss(a, b, 30.0, **kw)),
    ("siglip", lambda a, b, **kw: siglip_loss(a, b, 10.0, -5.0, **kw)),
    ("clip_reg", lambda a, b, **kw: clip_reg_loss(a, b, 30.0, 0.3, **kw)),
]


@pytest.mark.parametrize("name,fn", LOSSES)
@pytest.mark.parametrize("chunk", [1, 5, 16, 31])
def test_chunked_equals_unchunked_single_device(name, fn, chunk):
    rng = np.random.default_rng(chunk)
    img, txt = normalised(rng, 32, 16), normalised(rng, 32, 16)
    want = fn(img, txt)
    got = jax.jit(lambda a, b: fn(a, b, chunk_size=chunk))(img, txt)
    np.testing.assert_allclose(got, want, rtol=2e-6)
    g_want = jax.grad(lambda a, b: fn(a, b), argnums=(0, 1))(img, txt)
    g_got = jax.jit(jax.grad(lambda a, b: fn(a, b, chunk_size=chunk), argnums=(0, 1)))(img, txt)
    for w, g in zip(g_want, g_got):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-7)


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
    np.testing.assert_allclose(sharded(img, txt), fn(img, txt), rtol=2e-6)
    g_single = jax.grad(lambda a: fn(a, txt))(img)
    g_sharded = jax.grad(lambda a: sharded(a, txt))(img)
    np.testing.assert_allclose(g_sharded, g_single, rtol=1e-5, atol=1e-7)


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
