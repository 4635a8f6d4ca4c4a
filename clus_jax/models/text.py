"""Transformer text tower over token ids (trailing 0s = padding), causal or bidirectional, EOT or mean pooling."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from clus_jax.models.layers import ACT_BTE, Dtype, Encoder, dense_init, layer_norm


class TextTransformer(nn.Module):
    """CLIP-style text encoder. 'eot' pools the last non-padding token (the end-of-text token); 'argmax' the
    token with the largest id, as open_clip does (the same token for CLIP's BPE, whose EOT id is the largest)."""

    vocab_size: int
    context_length: int
    width: int
    depth: int
    heads: int
    mlp_dim: int
    causal: bool = True
    pooling: str = "eot"  # 'eot' | 'argmax' | 'mean'
    pad_id: int = 0
    pooled_last_block: bool = True  # with 'eot' or 'argmax': the last block computes the pooled token only (exact)
    remat: bool = False
    dtype: Dtype = jnp.float32
    act: str = "gelu"  # the MLP activation, a key of layers.ACTIVATIONS
    layer_scale_init: float = 0.0  # > 0: per-channel scales on every residual branch (layers.Block)

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
        encoder = Encoder(self.depth, self.heads, self.mlp_dim, causal=self.causal, remat=self.remat, dtype=self.dtype,
                          act=self.act, layer_scale_init=self.layer_scale_init, name="encoder")
        last = jnp.maximum(last, 0)  # the EOT token: the last one that is not padding
        if self.pooling == "argmax":  # open_clip's pooling: the first largest id (CLIP's EOT is the largest)
            last = jnp.argmax(tokens, axis=1).astype(jnp.int32)
        if self.pooling in ("eot", "argmax") and self.pooled_last_block:
            return layer_norm(self.dtype, "ln_final")(encoder(x, mask, pooled_index=last))[:, 0]
        x = layer_norm(self.dtype, "ln_final")(encoder(x, mask))
        if self.pooling in ("eot", "argmax"):
            return jnp.take_along_axis(x, last[:, None, None], axis=1)[:, 0]
        if self.pooling == "mean":
            w = valid.astype(x.dtype)[..., None]
            return (x * w).sum(axis=1) / jnp.maximum(w.sum(axis=1), 1.0)
        raise ValueError(f"unknown text pooling {self.pooling!r}")
