"""Transformer text tower over token ids (trailing 0s = padding), causal or bidirectional, EOT or mean pooling."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from clus_jax.models.layers import ACT_BTE, Dtype, Encoder, dense_init, layer_norm


class TextTransformer(nn.Module):
    """CLIP-style text encoder. 'eot' pools the last non-padding token (the end-of-text token)."""

    vocab_size: int
    context_length: int
    width: int
    depth: int
    heads: int
    mlp_dim: int
    causal: bool = True
    pooling: str = "eot"  # 'eot' | 'mean'
    pad_id: int = 0
    pooled_last_block: bool = True  # with 'eot': the last block computes the EOT token only (exact)
    remat: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        b, t = tokens.shape
        if t > self.context_length:
            raise ValueError(f"text length {t} exceeds context_length {self.context_length}")
        embed = self.param("token_embed", nn.with_logical_partitioning(dense_init(), ("vocab", "embed")), (self.vocab_size, self.width))
        pos = self.param("pos_embed", nn.with_logical_partitioning(dense_init(0.01), (None, "embed")), (self.context_length, self.width))
        x = jnp.take(embed, tokens, axis=0).astype(self.dtype) + pos[:t].astype(self.dtype)
        x = nn.with_logical_constraint(x, ACT_BTE)
        # Padding is the run of pad ids after the text; a pad id inside it is a real token (CLIP's BPE
        # gives id 0 to '!', as in '!~'), so it is attended to, averaged, and never mistaken for the end.
        positions = jnp.arange(t)[None, :]
        last = jnp.max(jnp.where(tokens != self.pad_id, positions, -1), axis=1)  # -1: an all-padding row
        valid = positions <= last[:, None]  # [B, T]
        mask = valid[:, None, None, :]  # keys that are padding are never attended to
        encoder = Encoder(self.depth, self.heads, self.mlp_dim, causal=self.causal, remat=self.remat, dtype=self.dtype, name="encoder")
        last = jnp.maximum(last, 0)  # the EOT token: the last one that is not padding
        if self.pooling == "eot" and self.pooled_last_block:
            return layer_norm(self.dtype, "ln_final")(encoder(x, mask, pooled_index=last))[:, 0]
        x = layer_norm(self.dtype, "ln_final")(encoder(x, mask))
        if self.pooling == "eot":
            return jnp.take_along_axis(x, last[:, None, None], axis=1)[:, 0]
        if self.pooling == "mean":
            w = valid.astype(x.dtype)[..., None]
            return (x * w).sum(axis=1) / jnp.maximum(w.sum(axis=1), 1.0)
        raise ValueError(f"unknown text pooling {self.pooling!r}")
