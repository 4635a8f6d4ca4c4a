"""The architecture options of the towers (open_clip's ViT-* CLIP configs): activations, layer scale, no patch
bias, no ln_pre, pixel mean and std, text pooling at the largest token id; and defaults that are unchanged.

Oracles: NumPy formulas (float64) for the activations and the pixel normalisation; for layer scale, the same
block without scales whose output projections are pre-multiplied by them; for argmax pooling, EOT pooling of
the text cut right after the largest id (the causal tower cannot see later tokens).
"""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clus_jax.config import base as config_base
from clus_jax.models import layers
from clus_jax.models.layers import Block, Mlp
from clus_jax.models.text import TextTransformer
from clus_jax.models.towers import build_model, init_inputs
from clus_jax.models.vit import VisionTransformer
from clus_jax.common.trees import path_str

import tolerances  # registered by tests/conftest.py

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def paths(params):
    return {path_str(p) for p, _ in jax.tree_util.tree_leaves_with_path(nn.unbox(params))}


def init(module, *args):
    return nn.unbox(jax.jit(module.init)(jax.random.key(0), *args)["params"])


def apply(module, params, *args):
    return np.asarray(jax.jit(module.apply)({"params": params}, *args))


def test_activations_are_the_exact_gelu_and_quick_gelu():
    x = np.linspace(-6, 6, 241)
    erf = np.vectorize(math.erf)
    gelu = 0.5 * x * (1 + erf(x / math.sqrt(2)))
    quick = x / (1 + np.exp(-1.702 * x))
    # x rounds to float32 (u |x|, times a slope <= 1.13), erf / exp are within a few ulps and three more
    # roundings follow, each within u of a value at most |x| <= 6: 8 u * 6 = 2.9e-6. The tanh approximation
    # of GELU is 4.7e-4 away, quick_gelu 0.02.
    atol = 8 * tolerances.U32 * 6.0
    np.testing.assert_allclose(layers.ACTIVATIONS["gelu"](jnp.asarray(x, jnp.float32)), gelu, rtol=0, atol=atol)
    np.testing.assert_allclose(layers.ACTIVATIONS["quick_gelu"](jnp.asarray(x, jnp.float32)), quick, rtol=0, atol=atol)
    # and the MLP uses the one it is given: fc2(act(fc1 x)) by hand, in float64
    mlp = Mlp(8, act="quick_gelu")
    h = np.random.default_rng(0).normal(size=(2, 3, 4)).astype(np.float32)
    p = init(mlp, h)
    p = jax.tree.map(lambda v: v + 0.1, p)  # nonzero biases
    w1, b1, w2, b2 = (np.asarray(v, np.float64) for v in (p["fc1"]["kernel"], p["fc1"]["bias"], p["fc2"]["kernel"],
                                                           p["fc2"]["bias"]))
    hidden = h @ w1 + b1
    act = hidden / (1 + np.exp(-1.702 * hidden))
    want = act @ w2 + b2
    # float32: fc1's 4 products and bias are within gamma(5) of their absolute sum; quick_gelu has a slope
    # <= 1.1 and its own 8 u |hidden| (above); fc2 adds gamma(9) of its absolute terms.
    hidden_err = tolerances.gamma(5) * (np.abs(h) @ np.abs(w1) + np.abs(b1))
    act_err = 1.1 * hidden_err + 8 * tolerances.U32 * np.abs(hidden)
    atol = act_err @ np.abs(w2) + tolerances.gamma(9) * (np.abs(act) @ np.abs(w2) + np.abs(b2))
    np.testing.assert_allclose(apply(mlp, p, h), want, rtol=0, atol=float(atol.max()))


def test_pixel_normalisation_default_is_bitwise_the_old_map_and_mean_std_follow_open_clip():
    images = np.random.default_rng(0).integers(0, 256, (2, 4, 4, 3), dtype=np.uint8)
    vit = VisionTransformer(patch_size=4, width=8, depth=1, heads=2, mlp_dim=16)
    old = jax.jit(lambda x: x.astype(jnp.float32) / 127.5 - 1.0)  # the tower's expression before the option
    # The same float32 expression compiled the same way: bitwise.
    assert np.array_equal(np.asarray(jax.jit(vit.normalize)(images)), np.asarray(old(images)))
    vit = vit.clone(mean=OPENAI_MEAN, std=OPENAI_STD)
    want = (images / 255.0 - np.array(OPENAI_MEAN)) / np.array(OPENAI_STD)  # ToTensor + Normalize, float64
    # x / (255 std) - mean / std in float32: each term carries at most 4 roundings (the constant, its product
    # or quotient, the division, perhaps by a reciprocal), the subtraction one of the result: 1.4e-6 here.
    terms = images / (255.0 * np.array(OPENAI_STD)) + np.array(OPENAI_MEAN) / np.array(OPENAI_STD)
    atol = 4 * tolerances.U32 * terms.max() + tolerances.U32 * np.abs(want).max()
    np.testing.assert_allclose(np.asarray(vit.normalize(images)), want, rtol=0, atol=atol)
    floats = np.ones((1, 4, 4, 3), np.float32)
    assert np.array_equal(np.asarray(vit.normalize(floats)), floats)  # already normalised


def test_layer_scale_multiplies_each_branch_by_its_own_per_channel_scale():
    x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 5, 8)), jnp.float32)
    scaled = Block(heads=2, mlp_dim=16, layer_scale_init=0.3)
    p = init(scaled, x)
    np.testing.assert_array_equal(p["ls1"], np.full(8, 0.3, np.float32))
    rng = np.random.default_rng(2)
    p = {**p, "ls1": jnp.asarray(rng.uniform(0.1, 2, 8), jnp.float32), "ls2": jnp.asarray(rng.uniform(0.1, 2, 8), jnp.float32)}
    p = jax.tree.map(lambda v: v + 0.05, p) | {"ls1": p["ls1"], "ls2": p["ls2"]}
    # the oracle: no scales, the branches' last projections multiplied by them instead
    plain = {k: v for k, v in p.items() if k not in ("ls1", "ls2")}
    plain["attn"] = {**p["attn"], "out_kernel": p["attn"]["out_kernel"] * p["ls1"], "out_bias": p["attn"]["out_bias"] * p["ls1"]}
    plain["mlp"] = {**p["mlp"], "fc2": {"kernel": p["mlp"]["fc2"]["kernel"] * p["ls2"], "bias": p["mlp"]["fc2"]["bias"] * p["ls2"]}}
    got = apply(scaled, p, x)
    want = apply(Block(heads=2, mlp_dim=16), plain, x)
    # ls * (h @ W) against h @ (W * ls): one more rounding per term of the 16-term sums (n = 17), in the
    # attention branch and the MLP branch after it (depth 2).
    atol = tolerances.network_atol(17, float(np.max(np.abs(want))), 2)
    np.testing.assert_allclose(got, want, rtol=0, atol=atol)
    # Without the scales (in [0.1, 2]) the branches change by O(1), far beyond atol (~1e-5).
    assert not np.allclose(got, apply(Block(heads=2, mlp_dim=16), {k: v for k, v in p.items() if k[:2] != "ls"}, x),
                           rtol=0, atol=1e-3)


def test_patch_bias_and_ln_pre_switch_their_parameters_off():
    images = jnp.zeros((1, 8, 8, 3), jnp.uint8)
    base = VisionTransformer(patch_size=4, width=8, depth=1, heads=2, mlp_dim=16)
    assert {"patch_embed/bias", "ln_pre/scale"} <= paths(jax.eval_shape(base.init, jax.random.key(0), images)["params"])
    off = paths(jax.eval_shape(base.clone(patch_bias=False, ln_pre=False).init, jax.random.key(0), images)["params"])
    assert not any(p.startswith(("ln_pre", "patch_embed/bias")) for p in off) and "patch_embed/kernel" in off


@pytest.mark.parametrize("pooled_last_block", [True, False])
def test_argmax_pooling_reads_the_first_largest_id(pooled_last_block):
    tower = TextTransformer(vocab_size=60, context_length=8, width=16, depth=2, heads=2, mlp_dim=32, pooling="argmax",
                            pooled_last_block=pooled_last_block)
    params = init(tower, jnp.ones((1, 8), jnp.int32))
    tokens = np.array([[5, 59, 7, 59, 3, 0, 0, 0],   # the largest id twice: the first one
                       [4, 0, 9, 2, 58, 1, 0, 0],    # a 0 inside the text, the largest id not last
                       [1, 2, 3, 4, 5, 6, 7, 59]], np.int32)
    got = apply(tower, params, tokens)
    cut = np.zeros_like(tokens)
    for i, first in enumerate((1, 4, 7)):
        cut[i, : first + 1] = tokens[i, : first + 1]  # nothing after the pooled token: EOT pooling reads it
    want = apply(tower.clone(pooling="eot"), params, cut)
    # Other tokens after the pooled one (masked, so exact zeros in attention) and, with pooled_last_block, the
    # last block on one token: the same sums, blocked differently. Width 16, MLP 32, 2 blocks + embedding.
    np.testing.assert_allclose(got, want, rtol=0, atol=tolerances.network_atol(32, float(np.max(np.abs(want))), 3))
    # Pooling another token moves the output by O(1), far beyond that (~1e-5).
    assert not np.allclose(got[:2], apply(tower.clone(pooling="eot"), params, tokens)[:2], rtol=0, atol=1e-3)


@pytest.mark.parametrize("conv_stem", [(), (32, 64)])
def test_defaults_keep_the_original_parameter_tree(conv_stem):
    """Checkpoints of existing configs must load: no new parameter, none removed, with the default keys. The
    options off (conv_stem=(), the plain patchify) give the original tree; the default stem adds its two
    convolutions' kernels and biases and nothing else."""
    config = config_base.base_config()
    config.model.image.conv_stem = conv_stem
    module = build_model(config.model)
    inputs = init_inputs(config.model)
    shapes = jax.eval_shape(module.init, jax.random.key(0), inputs["image"], inputs["text"])["params"]
    got = paths(shapes)
    assert {"image/patch_embed/bias", "image/ln_pre/scale", "image/ln_pre/bias"} <= got
    assert not any("/ls1" in p or "/ls2" in p for p in got)
    stem = {f"image/stem_conv_{i}/{k}" for i in range(len(conv_stem)) for k in ("kernel", "bias")}
    assert stem <= got
    # counted by hand: image 8 (patch kernel+bias, cls, pos, ln_pre, ln_post) + 4 blocks x 12 (ln1 2, attn 4,
    # ln2 2, mlp 4); text 4 (token and position embeddings, ln_final) + the nano text tower's 2 blocks x 12;
    # two projections; logit scale
    assert len(got) == 8 + 4 * 12 + 4 + 2 * 12 + 2 + 1 + len(stem)
