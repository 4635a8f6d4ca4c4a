"""Model tests: shapes, logical annotations on every parameter, named sizes, dtype and remat knobs."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from clus_jax.models import sizes
from clus_jax.models.towers import build_model

import tolerances  # registered by tests/conftest.py

# The 'mu' towers: 2 blocks of width 64 and MLP 256; the longest reduction is the MLP's 256 terms (a weight
# gradient sums at most 4 x 17 tokens). Depth: the blocks plus one for the patch/token embedding and head,
# twice for a gradient (tolerances.network_atol).
N_REDUCE, FORWARD_DEPTH, GRAD_DEPTH = 256, 3, 6
# x / ||x|| and np.linalg.norm each sum 32 squares (gamma(32) relative, halved by the sqrt) and round a few
# times (rsqrt, divide, multiply: within 4u): the norm is 1 within gamma(32) + 8u ~ 2.4e-6.
NORM_RTOL = tolerances.gamma(32) + 8 * tolerances.U32


def model_config(**overrides):
    cfg = ml_collections.ConfigDict(
        dict(
            image=dict(size="mu", image_size=16, patch_size=4, pooling="cls", width=0, depth=0, heads=0, mlp_dim=0),
            text=dict(size="mu", context_length=8, vocab_size=50, causal=True, pooling="eot", width=0, depth=0, heads=0, mlp_dim=0),
            embed_dim=32, logit_scale_init=2.0, logit_bias_init=None, max_logit_scale=100.0,
            dtype="float32", remat=False,
        )
    )
    cfg.update_from_flattened_dict(overrides) if overrides else None
    return cfg


def inputs(b=3, size=16, length=8):
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.integers(0, 256, (b, size, size, 3), dtype=np.uint8))
    text = np.zeros((b, length), np.int32)
    text[:, :5] = rng.integers(1, 50, (b, 5))
    return images, jnp.asarray(text)


@pytest.mark.parametrize("pooling", ["cls", "gap", "map"])
def test_outputs_are_normalised_embeddings(pooling):
    model = build_model(model_config(**{"image.pooling": pooling}))
    images, text = inputs()
    variables = model.init(jax.random.key(0), images, text)
    out = model.apply(variables, images, text)
    assert out["image_emb"].shape == (3, 32) and out["text_emb"].shape == (3, 32)
    np.testing.assert_allclose(np.linalg.norm(out["image_emb"], axis=-1), 1.0, rtol=NORM_RTOL)
    np.testing.assert_allclose(np.linalg.norm(out["text_emb"], axis=-1), 1.0, rtol=NORM_RTOL)
    # One float32 exp (XLA's is within a few ulps, 2u each): 1e-6 is 8 ulps.
    np.testing.assert_allclose(out["logit_scale"], np.exp(2.0), rtol=1e-6)


def test_every_parameter_carries_logical_axes():
    model = build_model(model_config(**{"image.pooling": "map", "logit_bias_init": -10.0}))
    images, text = inputs()
    boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), images, text))["params"]
    leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    unannotated = [leaf for leaf in leaves if not isinstance(leaf, nn.LogicallyPartitioned) and leaf.ndim > 0]
    assert not unannotated, unannotated
    for leaf in leaves:
        if isinstance(leaf, nn.LogicallyPartitioned):
            assert len(leaf.names) == leaf.value.ndim, (leaf.names, leaf.value.shape)


def test_the_model_holds_no_method_parameters():
    """Towers, projections and the logit scale/bias only: prototype banks belong to the swap objective."""
    model = build_model(model_config(logit_bias_init=-10.0))
    images, text = inputs()
    params = jax.eval_shape(lambda: model.init(jax.random.key(0), images, text))["params"]
    assert set(params) == {"image", "text", "image_proj", "text_proj", "logit_scale", "logit_bias"}


def test_text_padding_does_not_change_the_embedding():
    """Extra padding after the end token must not change a causal or bidirectional text embedding."""
    for causal in (True, False):
        cfg = model_config(**{"text.causal": causal, "text.context_length": 12})
        model = build_model(cfg)
        images, text = inputs(length=8)
        longer = jnp.concatenate([text, jnp.zeros((3, 4), jnp.int32)], axis=1)
        variables = model.init(jax.random.key(0), images, longer)
        a = model.apply(variables, text, method="encode_text")
        b = model.apply(variables, longer, method="encode_text")
        # Padded keys add exact zeros to attention, but sums over 12 keys may be blocked unlike over 8.
        atol = tolerances.network_atol(N_REDUCE, float(np.max(np.abs(a))), FORWARD_DEPTH)
        np.testing.assert_allclose(a, b, rtol=0, atol=atol)


def test_causal_text_ignores_future_tokens_before_pooling():
    model = build_model(model_config(**{"text.pooling": "eot"}))
    images, text = inputs()
    variables = model.init(jax.random.key(0), images, text)
    base = model.apply(variables, text, method="encode_text")
    changed = text.at[:, 4].set(7)  # the last (pooled) token itself changes -> embedding changes
    # Far above rounding (network_atol ~ 1e-4 of the embedding): the change moves unit vectors by O(0.1).
    assert not np.allclose(base, model.apply(variables, changed, method="encode_text"), rtol=0, atol=1e-3)


@pytest.mark.slow  # compiles the towers three times
def test_remat_and_bfloat16_knobs():
    images, text = inputs()
    ref_model = build_model(model_config())
    variables = ref_model.init(jax.random.key(0), images, text)
    ref = ref_model.apply(variables, images, text)
    remat = build_model(model_config(remat=True)).apply(variables, images, text)
    # The same forward ops, but under jax.checkpoint they may be compiled (fused) differently.
    atol = tolerances.network_atol(N_REDUCE, float(np.max(np.abs(ref["image_emb"]))), FORWARD_DEPTH)
    np.testing.assert_allclose(remat["image_emb"], ref["image_emb"], rtol=0, atol=atol)
    bf16 = build_model(model_config(dtype="bfloat16")).apply(variables, images, text)
    assert bf16["image_emb"].dtype == jnp.float32  # embeddings come back in float32 for the losses
    # bfloat16 rounds each layer's inputs and outputs (u = 2**-8 = 3.9e-3; products accumulate in float32):
    # a few roundings in each of the 3 layers, ~12 u = 0.047 of the unit embedding's entries (|x| <= 1).
    np.testing.assert_allclose(ref["image_emb"], bf16["image_emb"], atol=0.05)
    grads = jax.grad(lambda p: build_model(model_config(remat=True)).apply(p, images, text)["image_emb"].sum())(variables)
    assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))


def test_named_sizes():
    b16 = sizes.vit_size("B/16")
    assert (b16.width, b16.depth, b16.heads, b16.mlp_dim, b16.patch_size) == (768, 12, 12, 3072, 16)
    l14 = sizes.vit_size("L/14")
    assert (l14.width, l14.depth, l14.heads, l14.patch_size) == (1024, 24, 16, 14)
    assert sizes.text_size("base").width == 512 and sizes.text_size("base").depth == 12
    with pytest.raises(KeyError, match="unknown image size"):
        sizes.vit_size("Q/16")


def test_vit_b16_with_12_layer_512_text_tower_is_a_config_line():
    """ViT-B/16 + 12-layer 512-wide text tower: shapes only (no memory), from config values alone."""
    cfg = model_config(**{"image.size": "B/16", "image.patch_size": 0, "image.image_size": 224, "text.size": "base",
                          "text.context_length": 77, "text.vocab_size": 49408, "embed_dim": 512})
    model = build_model(cfg)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3), jnp.uint8), jnp.ones((1, 77), jnp.int32)))
    n_params = sum(np.prod(x.shape) for x in jax.tree.leaves(nn.meta.unbox(shapes)))
    # CLIP ViT-B/16 has about 149.6M parameters (86M image + 63M text + projections).
    assert 145e6 < n_params < 155e6, n_params


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("remat", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_pooled_last_block_matches_the_full_last_block(causal, remat):
    """The last block computing only the CLS / EOT token gives the full stack's values and gradients."""
    overrides = {"text.causal": causal, "remat": remat}
    pruned = build_model(model_config(**overrides, pooled_last_block=True))
    full = build_model(model_config(**overrides, pooled_last_block=False))
    images, text = inputs(b=4)
    text = text.at[1, 5:].set(7).at[2, 2:].set(0)  # EOT at positions 4, 7 (no padding), 1 and 4
    variables = full.init(jax.random.key(1), images, text)
    # Non-zero biases and a random CLS token, so no term of the comparison is trivially zero.
    variables = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.key(p.size), p.shape), variables)

    def loss(model, params):
        out = model.apply(params, images, text)
        return jnp.sum(out["image_emb"] @ out["text_emb"].T * jnp.arange(16.0).reshape(4, 4))

    a, b = full.apply(variables, images, text), pruned.apply(variables, images, text)
    # The last block on one token instead of all: the same sums, blocked differently.
    for key in ("image_emb", "text_emb"):
        atol = tolerances.network_atol(N_REDUCE, float(np.max(np.abs(a[key]))), FORWARD_DEPTH)
        np.testing.assert_allclose(b[key], a[key], rtol=0, atol=atol)
    grads_full = jax.grad(lambda p: loss(full, p))(variables)
    grads_pruned = jax.grad(lambda p: loss(pruned, p))(variables)
    for (path, g_full), g_pruned in zip(jax.tree_util.tree_leaves_with_path(grads_full), jax.tree.leaves(grads_pruned)):
        atol = tolerances.network_atol(N_REDUCE, float(np.max(np.abs(g_full))), GRAD_DEPTH)  # ~2e-4 of the leaf
        np.testing.assert_allclose(g_pruned, g_full, rtol=0, atol=atol, err_msg=jax.tree_util.keystr(path))


def test_pooled_last_block_leaves_mean_and_gap_pooling_alone():
    cfg = dict(**{"image.pooling": "gap", "text.pooling": "mean"})
    pruned, full = (build_model(model_config(**cfg, pooled_last_block=p)) for p in (True, False))
    images, text = inputs()
    variables = full.init(jax.random.key(0), images, text)
    a, b = full.apply(variables, images, text), pruned.apply(variables, images, text)
    # The option does nothing for these poolings: the same program, so bitwise the same.
    np.testing.assert_array_equal(a["image_emb"], b["image_emb"])
    np.testing.assert_array_equal(a["text_emb"], b["text_emb"])
