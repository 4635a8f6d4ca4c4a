"""Two towers, projection heads to a shared embedding, logit scale/bias, and prototype banks.

The model returns per-example outputs that objectives consume (``image_emb``, ``text_emb``, both L2
normalised in float32, plus ``logit_scale`` and ``logit_bias``). Prototype banks are ordinary parameters
(``params['prototypes']['bank_<i>']``, shape [K_i, embed_dim]) so the optimizer sees them and a
config can freeze them; objectives score embeddings against them.
"""
from __future__ import annotations

import math
import numbers
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from clus_jax.models import sizes
from clus_jax.models.layers import Dtype, dense_init
from clus_jax.models.text import TextTransformer
from clus_jax.models.vit import VisionTransformer

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def l2_normalize(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    x = x.astype(jnp.float32)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


def normalized_rows_init(key: jax.Array, shape: Sequence[int], dtype: Any = jnp.float32) -> jax.Array:
    """Gaussian rows scaled to unit length (prototypes start on the sphere)."""
    return l2_normalize(jax.random.normal(key, shape, jnp.float32)).astype(dtype)


class PrototypeBanks(nn.Module):
    """Bias-free prototype matrices, one per requested size (several sizes = several clusterings)."""

    num_prototypes: tuple[int, ...]
    embed_dim: int

    @nn.compact
    def __call__(self) -> list[jax.Array]:
        return [
            self.param(f"bank_{i}", nn.with_logical_partitioning(normalized_rows_init, ("prototypes", "proj")), (k, self.embed_dim))
            for i, k in enumerate(self.num_prototypes)
        ]


class TwoTower(nn.Module):
    image: nn.Module
    text: nn.Module
    embed_dim: int
    logit_scale_init: float = math.log(1 / 0.07)
    logit_bias_init: float | None = None
    max_logit_scale: float = 100.0
    num_prototypes: tuple[int, ...] = ()
    dtype: Dtype = jnp.float32

    def setup(self) -> None:
        self.image_proj = nn.Dense(
            self.embed_dim, use_bias=False, dtype=self.dtype,
            kernel_init=nn.with_logical_partitioning(dense_init(self.image.width**-0.5), ("embed", "proj")),
        )
        self.text_proj = nn.Dense(
            self.embed_dim, use_bias=False, dtype=self.dtype,
            kernel_init=nn.with_logical_partitioning(dense_init(self.text.width**-0.5), ("embed", "proj")),
        )
        self.logit_scale = self.param("logit_scale", nn.initializers.constant(self.logit_scale_init), ())
        if self.logit_bias_init is not None:
            self.logit_bias = self.param("logit_bias", nn.initializers.constant(self.logit_bias_init), ())
        if self.num_prototypes:
            self.prototypes = PrototypeBanks(tuple(self.num_prototypes), self.embed_dim)

    def encode_image(self, images: jax.Array) -> jax.Array:
        return l2_normalize(self.image_proj(self.image(images)))

    def encode_text(self, tokens: jax.Array) -> jax.Array:
        return l2_normalize(self.text_proj(self.text(tokens)))

    def __call__(self, images: jax.Array, tokens: jax.Array) -> dict[str, jax.Array]:
        out = {
            "image_emb": self.encode_image(images),
            "text_emb": self.encode_text(tokens),
            # Clamped like open_clip (logit_scale.clamp(0, ln 100)), applied on the way out.
            "logit_scale": jnp.exp(jnp.clip(self.logit_scale, 0.0, math.log(self.max_logit_scale))),
        }
        if self.logit_bias_init is not None:
            out["logit_bias"] = self.logit_bias
        if self.num_prototypes:
            self.prototypes()  # creates the banks at init; objectives read them from params
        return out


def _resolve(size: sizes.TransformerSize, cfg: ml_collections.ConfigDict) -> dict[str, int]:
    resolved = {}
    for field in ("width", "depth", "heads", "mlp_dim"):
        override = cfg.get(field)
        resolved[field] = int(override) if override else getattr(size, field)
    return resolved


def bank_sizes(model_config: ml_collections.ConfigDict) -> tuple[int, ...]:
    """``config.model.num_prototypes`` (an int or a list of ints) as a tuple of ints; empty when unset."""
    value = model_config.get("num_prototypes") or ()
    return (int(value),) if isinstance(value, numbers.Integral) else tuple(int(k) for k in value)


def build_model(model_config: ml_collections.ConfigDict) -> TwoTower:
    """Builds the two-tower model from ``config.model`` (sizes by name, any field overridable)."""
    dtype = DTYPES[model_config.get("dtype", "float32")]
    remat = bool(model_config.get("remat", False))
    pooled = bool(model_config.get("pooled_last_block", True))
    icfg, tcfg = model_config.image, model_config.text
    isize = sizes.vit_size(icfg.size)
    patch = icfg.get("patch_size") or isize.patch_size
    image = VisionTransformer(
        patch_size=int(patch), pooling=icfg.get("pooling", "cls"), pooled_last_block=pooled, remat=remat, dtype=dtype, **_resolve(isize, icfg)
    )
    text = TextTransformer(
        vocab_size=int(tcfg.vocab_size), context_length=int(tcfg.context_length),
        causal=bool(tcfg.get("causal", True)), pooling=tcfg.get("pooling", "eot"), pooled_last_block=pooled, remat=remat,
        dtype=dtype,
        **_resolve(sizes.text_size(tcfg.size), tcfg),
    )
    bias = model_config.get("logit_bias_init")
    return TwoTower(
        image=image, text=text, embed_dim=int(model_config.embed_dim),
        logit_scale_init=float(model_config.get("logit_scale_init", math.log(1 / 0.07))),
        logit_bias_init=None if bias is None else float(bias),
        max_logit_scale=float(model_config.get("max_logit_scale", 100.0)),
        num_prototypes=bank_sizes(model_config), dtype=dtype,
    )
