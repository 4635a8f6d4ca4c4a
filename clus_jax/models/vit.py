"""Vision Transformer image tower (patch embedding, pre-LN blocks, CLS / mean / attention pooling).

The options after ``dtype`` (activation, layer scale, patch bias, ``ln_pre``, pixel mean and std) make
open_clip's ViT-* image towers expressible (``clus_jax.interop``); their defaults are the original tower.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from clus_jax.models.layers import ACT_BTE, ACTIVATIONS, Dtype, Encoder, Mlp, dense_init, layer_norm


class MapHead(nn.Module):
    """Multihead attention pooling: one learned probe cross-attends over all tokens (big_vision's 'map')."""

    heads: int
    mlp_dim: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, _, width = x.shape
        head_dim = width // self.heads
        probe = self.param("probe", nn.with_logical_partitioning(dense_init(), (None, None, "embed")), (1, 1, width))
        w_q = self.param("q_kernel", nn.with_logical_partitioning(dense_init(), ("embed", "heads", "kv")), (width, self.heads, head_dim))
        w_kv = self.param(
            "kv_kernel", nn.with_logical_partitioning(dense_init(), ("embed", None, "heads", "kv")), (width, 2, self.heads, head_dim)
        )
        w_out = self.param("out_kernel", nn.with_logical_partitioning(dense_init(), ("heads", "kv", "embed")), (self.heads, head_dim, width))
        q = jnp.einsum("bd,dhk->bhk", jnp.broadcast_to(probe[0].astype(self.dtype), (b, width)), w_q.astype(self.dtype))[:, None]
        kv = jnp.einsum("btd,dshk->btshk", x, w_kv.astype(self.dtype))
        y = jax.nn.dot_product_attention(q, kv[:, :, 0], kv[:, :, 1])
        y = jnp.einsum("bthk,hkd->btd", y, w_out.astype(self.dtype))
        y = y + Mlp(self.mlp_dim, self.dtype, name="mlp")(layer_norm(self.dtype, "ln")(y))
        return y[:, 0]


class VisionTransformer(nn.Module):
    """ViT over uint8 or float images in NHWC; returns the pooled feature of width ``width``."""

    patch_size: int
    width: int
    depth: int
    heads: int
    mlp_dim: int
    pooling: str = "cls"  # 'cls' | 'gap' | 'map'
    pooled_last_block: bool = True  # with 'cls': the last block computes the CLS token only (exact)
    remat: bool = False
    dtype: Dtype = jnp.float32
    act: str = "gelu"  # the MLP activation, a key of layers.ACTIVATIONS
    layer_scale_init: float = 0.0  # > 0: per-channel scales on every residual branch (layers.Block)
    patch_bias: bool = True  # the patch embedding's bias (open_clip's conv1 has none)
    ln_pre: bool = True  # LayerNorm after the patch and position embeddings (open_clip's no_ln_pre=False)
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)  # uint8 RGB pixels become (x / 255 - mean) / std
    std: tuple[float, ...] = (0.5, 0.5, 0.5)
    # Channels of a convolutional stem (Xiao et al. 2021, "Early convolutions help transformers see
    # better"): one 3x3 stride-2 convolution + activation per entry before the patch embedding, which then
    # patchifies the stem's output with patch_size / 2**len(conv_stem). () = the plain patchify stem.
    conv_stem: tuple[int, ...] = ()

    def normalize(self, images: jax.Array) -> jax.Array:
        """uint8 pixels -> (x / 255 - mean) / std per channel, as x / (255 std) - mean / std (float32).

        Float images are taken as already normalised. When every channel has the same mean and std the two
        constants are scalars, so the default 0.5s compute x / 127.5 - 1.0, the tower's original expression.
        """
        if images.dtype != jnp.uint8:
            return images
        std = np.asarray(self.std, np.float32)
        scale, shift = np.float32(255) * std, np.asarray(self.mean, np.float32) / std
        if np.all(scale == scale[0]) and np.all(shift == shift[0]):
            scale, shift = float(scale[0]), float(shift[0])
        return images.astype(jnp.float32) / scale - shift

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        x = self.normalize(images).astype(self.dtype)
        for i, channels in enumerate(self.conv_stem):
            x = nn.Conv(
                int(channels), (3, 3), strides=2, padding="SAME", dtype=self.dtype,
                kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), (None, None, None, None)),
                bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (None,)),
                name=f"stem_conv_{i}",
            )(x)
            x = ACTIVATIONS[self.act](x)
        b, h, w, c = x.shape
        p = self.patch_size // 2 ** len(self.conv_stem)
        x = x.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, (h // p) * (w // p), p * p * c)
        x = nn.Dense(
            self.width,
            dtype=self.dtype,
            use_bias=self.patch_bias,
            kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("patch", "embed")),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
            name="patch_embed",
        )(x)
        if self.pooling == "cls":
            cls = self.param("cls", nn.with_logical_partitioning(nn.initializers.zeros, (None, None, "embed")), (1, 1, self.width))
            x = jnp.concatenate([jnp.broadcast_to(cls.astype(self.dtype), (b, 1, self.width)), x], axis=1)
        pos = self.param(
            "pos_embed", nn.with_logical_partitioning(dense_init(self.width**-0.5), (None, None, "embed")), (1, x.shape[1], self.width)
        )
        x = x + pos.astype(self.dtype)
        x = nn.with_logical_constraint(x, ACT_BTE)
        if self.ln_pre:
            x = layer_norm(self.dtype, "ln_pre")(x)
        pooled_index = jnp.zeros((b,), jnp.int32) if self.pooling == "cls" and self.pooled_last_block else None
        encoder = Encoder(self.depth, self.heads, self.mlp_dim, causal=False, remat=self.remat, dtype=self.dtype,
                          act=self.act, layer_scale_init=self.layer_scale_init, name="encoder")
        x = layer_norm(self.dtype, "ln_post")(encoder(x, pooled_index=pooled_index))
        if self.pooling == "cls":
            return x[:, 0]
        if self.pooling == "gap":
            return x.mean(axis=1)
        if self.pooling == "map":
            return MapHead(self.heads, self.mlp_dim, self.dtype, name="map_head")(x)
        raise ValueError(f"unknown image pooling {self.pooling!r}")
