"""The image tower's convolutional stem (config.model.image.conv_stem) against a NumPy transcription."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clus_jax.config import base as config_base
from clus_jax.config import check as config_check
from clus_jax.models import flops
from clus_jax.models.vit import VisionTransformer

import tolerances  # registered by tests/conftest.py


def numpy_conv3x3_stride2_same(x: np.ndarray, kernel: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """A 3x3 stride-2 'SAME' convolution by loops: output side ceil(n / 2), padding 0 before and 1 after for an
    even side (TensorFlow's SAME: total padding max(3 - 2, 0) = 1, the extra row and column at the end)."""
    b, n, _, c_in = x.shape
    out_n = -(-n // 2)
    total = max((out_n - 1) * 2 + 3 - n, 0)
    lo = total // 2
    padded = np.zeros((b, n + total, n + total, c_in), np.float64)
    padded[:, lo:lo + n, lo:lo + n] = x
    out = np.zeros((b, out_n, out_n, kernel.shape[-1]), np.float64)
    for i in range(out_n):
        for j in range(out_n):
            window = padded[:, 2 * i:2 * i + 3, 2 * j:2 * j + 3, :]  # [b, 3, 3, c_in]
            out[:, i, j] = np.einsum("bhwc,hwco->bo", window, kernel)
    return out + bias


def exact_gelu(x: np.ndarray) -> np.ndarray:
    from scipy.special import erf

    return 0.5 * x * (1.0 + erf(x / np.sqrt(2.0)))


def test_stem_then_patchify_equals_numpy_convolutions_then_a_plain_tower():
    """The tower with conv_stem=(4, 6) and patch 4 on 16x16 images is the NumPy stem (two convolutions with exact
    GELU) followed by a plain tower patchifying the 4x4x6 map with patch 1 and the same remaining parameters."""
    images = np.random.default_rng(0).integers(0, 256, size=(2, 16, 16, 3), dtype=np.uint8)
    stem = VisionTransformer(patch_size=4, width=16, depth=2, heads=2, mlp_dim=32, conv_stem=(4, 6))
    params = stem.init(jax.random.key(1), jnp.asarray(images))["params"]
    params = jax.tree_util.tree_map(lambda v: v.unbox() if hasattr(v, "unbox") else v, params,
                                    is_leaf=lambda v: hasattr(v, "unbox"))
    assert params["patch_embed"]["kernel"].shape == (1 * 1 * 6, 16)
    x = images.astype(np.float64) / 127.5 - 1.0
    for i in range(2):
        conv = params[f"stem_conv_{i}"]
        x = exact_gelu(numpy_conv3x3_stride2_same(x, np.asarray(conv["kernel"], np.float64),
                                                  np.asarray(conv["bias"], np.float64)))
    assert x.shape == (2, 4, 4, 6)
    plain = VisionTransformer(patch_size=1, width=16, depth=2, heads=2, mlp_dim=32)
    rest = {k: v for k, v in params.items() if not k.startswith("stem_conv_")}
    want = plain.apply({"params": rest}, jnp.asarray(x, jnp.float32))
    got = stem.apply({"params": params}, jnp.asarray(images))
    # The float32 stem (27- and 36-term sums) against float64, then the same float32 tower on inputs that
    # differ by that: 2 convolutions + 2 blocks + the head (depth 5), MLP 32 and 36 the longest reductions.
    atol = tolerances.network_atol(36, float(np.max(np.abs(want))), 5)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=atol)


def test_default_tower_has_no_stem_parameters():
    images = jnp.zeros((1, 8, 8, 3), jnp.uint8)
    shapes = jax.eval_shape(VisionTransformer(patch_size=4, width=8, depth=1, heads=2, mlp_dim=16).init,
                            jax.random.key(0), images)["params"]
    assert not any(k.startswith("stem_conv_") for k in shapes)


def test_stem_flops_by_hand():
    """image 32, stem (32, 64): 16x16x9x3x32 + 8x8x9x32x64 multiply-adds; the patch embedding then reads
    1x1x64 inputs at each of the 64 tokens."""
    config = config_base.base_config()
    config.model.image.patch_size, config.model.image.conv_stem = 4, (32, 64)
    assert flops.conv_stem_flops(config.model) == 2.0 * (16 * 16 * 9 * 3 * 32 + 8 * 8 * 9 * 32 * 64)
    parts = flops.forward_flops_per_example(config.model)
    assert parts["image_patch_embed"] == 2.0 * 64 * 64 * 128
    config.model.image.conv_stem = ()
    assert flops.forward_flops_per_example(config.model)["image_stem"] == 0.0


@pytest.mark.parametrize("stem,patch,message", [
    ((32, 64, 128), 4, "divisible by 8"),
    ((32, 0), 4, "channel counts > 0"),
    ((3.5,), 4, "channel counts > 0"),
])
def test_bad_stems_fail_naming_the_key(stem, patch, message):
    config = config_base.load_config("configs/clip.py")
    config.model.image.patch_size, config.model.image.conv_stem = patch, stem
    with pytest.raises(config_check.ConfigError, match=rf"config\.model\.image\.conv_stem.*{message}"):
        config_check.validate(config, num_devices=1)
