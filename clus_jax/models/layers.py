"""Transformer building blocks shared by the image and text towers.

Every parameter carries logical axis names (``embed``, ``mlp``, ``heads``, ``kv``, ...) and every large
activation a logical constraint (``act_batch``, ``act_seq``, ...). One rule table in the config maps them to
mesh axes (see ``clus_jax.parallel.partitioning``), so the towers never mention the mesh.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

# Logical names for activations differ from parameter names so that FSDP ('embed' -> fsdp) never asks
# to shard an activation's feature axis over the axis that already splits its batch.
ACT_BTE = ("act_batch", "act_seq", "act_embed")
ACT_BTM = ("act_batch", "act_seq", "act_mlp")


def dense_init(std: float = 0.02) -> nn.initializers.Initializer:
    return nn.initializers.normal(stddev=std)


def quick_gelu(x: jax.Array) -> jax.Array:
    """OpenAI CLIP's GELU approximation, x * sigmoid(1.702 x) (open_clip's ``QuickGELU``)."""
    return x * jax.nn.sigmoid(1.702 * x)


# The MLP activations by config name: 'gelu' is the exact (erf) GELU, PyTorch's nn.GELU() default.
ACTIVATIONS = {"gelu": lambda x: nn.gelu(x, approximate=False), "quick_gelu": quick_gelu}


class Mlp(nn.Module):
    """Pre-LN transformer MLP: Dense -> activation (``ACTIVATIONS[act]``) -> Dense."""

    mlp_dim: int
    dtype: Dtype = jnp.float32
    act: str = "gelu"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        width = x.shape[-1]
        h = nn.Dense(
            self.mlp_dim,
            dtype=self.dtype,
            kernel_init=nn.with_logical_partitioning(dense_init(), ("embed", "mlp")),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("mlp",)),
            name="fc1",
        )(x)
        h = nn.with_logical_constraint(h, ACT_BTM)
        h = ACTIVATIONS[self.act](h)
        out = nn.Dense(
            width,
            dtype=self.dtype,
            kernel_init=nn.with_logical_partitioning(dense_init(), ("mlp", "embed")),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
            name="fc2",
        )(h)
        return nn.with_logical_constraint(out, ACT_BTE)


class Attention(nn.Module):
    """Multi-head self-attention with an optional causal mask and key-padding mask.

    Kernels are explicit [embed, 3, heads, head_dim] / [heads, head_dim, embed] parameters used with
    einsum, so the 'heads' axis can be tensor-parallel without a reshape in between.
    """

    heads: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None = None, causal: bool = False,
                 query_index: jax.Array | None = None) -> jax.Array:
        """[B, T, D] -> [B, T, D]; with ``query_index`` ([B] ints), only that token's query: [B, 1, D].

        With ``query_index`` the keys and values still come from every token, and a causal mask keeps
        the keys at or before the query's position, so the one output row equals row ``query_index`` of
        the full computation.
        """
        width = x.shape[-1]
        if width % self.heads:
            raise ValueError(f"width {width} is not divisible by heads {self.heads}")
        head_dim = width // self.heads
        w_qkv = self.param(
            "qkv_kernel", nn.with_logical_partitioning(dense_init(), ("embed", None, "heads", "kv")), (width, 3, self.heads, head_dim)
        )
        b_qkv = self.param(
            "qkv_bias", nn.with_logical_partitioning(nn.initializers.zeros, (None, "heads", "kv")), (3, self.heads, head_dim)
        )
        w_qkv, b_qkv = w_qkv.astype(self.dtype), b_qkv.astype(self.dtype)
        if query_index is None:
            qkv = jnp.einsum("btd,dshk->btshk", x, w_qkv) + b_qkv
            q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # [B, T, H, Dh]
        else:
            x_q = jnp.take_along_axis(x, query_index[:, None, None], axis=1)  # [B, 1, D]
            q = jnp.einsum("btd,dhk->bthk", x_q, w_qkv[:, 0]) + b_qkv[0]
            kv = jnp.einsum("btd,dshk->btshk", x, w_qkv[:, 1:]) + b_qkv[1:]
            k, v = kv[:, :, 0], kv[:, :, 1]
            if causal:
                before = jnp.arange(x.shape[1])[None, :] <= query_index[:, None]  # [B, T]
                before = before[:, None, None, :]
                mask = before if mask is None else mask & before
                causal = False
        q = nn.with_logical_constraint(q, ("act_batch", "act_seq", "act_heads", None))
        out = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=causal)
        w_out = self.param(
            "out_kernel", nn.with_logical_partitioning(dense_init(), ("heads", "kv", "embed")), (self.heads, head_dim, width)
        )
        b_out = self.param("out_bias", nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)), (width,))
        out = jnp.einsum("bthk,hkd->btd", out, w_out.astype(self.dtype)) + b_out.astype(self.dtype)
        return nn.with_logical_constraint(out, ACT_BTE)


def layer_norm(dtype: Dtype, name: str) -> nn.LayerNorm:
    return nn.LayerNorm(
        epsilon=1e-5,
        dtype=dtype,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
        name=name,
    )


class Block(nn.Module):
    """Pre-LN transformer block: x + attn(ln(x)); x + mlp(ln(x)).

    ``layer_scale_init > 0`` multiplies each branch by a learned per-channel scale (``ls1``, ``ls2``, CaiT's
    LayerScale, open_clip's ``ls_init_value``) initialised to that value; 0 has no scale parameters.
    """

    heads: int
    mlp_dim: int
    causal: bool = False
    dtype: Dtype = jnp.float32
    act: str = "gelu"
    layer_scale_init: float = 0.0

    def _scaled(self, name: str, branch: jax.Array) -> jax.Array:
        if not self.layer_scale_init:
            return branch
        gamma = self.param(name, nn.with_logical_partitioning(nn.initializers.constant(self.layer_scale_init), ("embed",)),
                           (branch.shape[-1],))
        return branch * gamma.astype(self.dtype)

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None = None, query_index: jax.Array | None = None) -> jax.Array:
        """[B, T, D] -> [B, T, D], or only token ``query_index`` ([B] ints) of the output: [B, 1, D]."""
        attn = Attention(self.heads, self.dtype, name="attn")(layer_norm(self.dtype, "ln1")(x), mask, self.causal, query_index)
        if query_index is not None:
            x = jnp.take_along_axis(x, query_index[:, None, None], axis=1)
        x = x + self._scaled("ls1", attn)
        x = x + self._scaled("ls2", Mlp(self.mlp_dim, self.dtype, self.act, name="mlp")(layer_norm(self.dtype, "ln2")(x)))
        return x


class Encoder(nn.Module):
    """A stack of blocks; ``remat`` recomputes each block's activations in the backward pass.

    Given ``pooled_index`` ([B] ints: the one token per example that pooling reads, CLS or EOT), the last
    block computes its query, output projection and MLP for that token only and the encoder returns
    [B, 1, D]: the same values as the full stack at that token, for about (depth - 1/6) / depth of the
    work (keys and values of the last block are still computed for every token).
    """

    depth: int
    heads: int
    mlp_dim: int
    causal: bool = False
    remat: bool = False
    dtype: Dtype = jnp.float32
    act: str = "gelu"
    layer_scale_init: float = 0.0

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None = None, pooled_index: jax.Array | None = None) -> jax.Array:
        block_cls = nn.remat(Block, static_argnums=()) if self.remat else Block
        for i in range(self.depth):
            last = i == self.depth - 1
            x = block_cls(self.heads, self.mlp_dim, self.causal, self.dtype, self.act, self.layer_scale_init, name=f"block_{i}")(
                x, mask, pooled_index if last else None)
        return x
