"""Two towers, projection heads to a shared embedding, and the logit scale/bias.

The model returns per-example outputs that objectives consume (``image_emb``, ``text_emb``, both L2
normalised in float32, plus ``logit_scale`` and ``logit_bias``). It holds no method's parameters:
prototype banks, class centres and the like belong to the objectives (``Objective.init_params``).
"""
from __future__ import annotations

import math
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from clus_jax.data import fields
from clus_jax.models import sizes
from clus_jax.models.layers import Dtype, dense_init
from clus_jax.models.text import TextTransformer
from clus_jax.models.vit import VisionTransformer

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def l2_normalize(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    x = x.astype(jnp.float32)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


class TwoTower(nn.Module):
    image: nn.Module
    text: nn.Module
    embed_dim: int
    logit_scale_init: float = math.log(1 / 0.07)
    logit_bias_init: float | None = None
    max_logit_scale: float = 100.0
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

    def encode_image(self, images: jax.Array) -> jax.Array:
        return l2_normalize(self.image_proj(self.image(images)))

    def encode_text(self, tokens: jax.Array) -> jax.Array:
        return l2_normalize(self.text_proj(self.text(tokens)))

    def __call__(self, images: jax.Array | None, tokens: jax.Array | None) -> dict[str, jax.Array]:
        """Outputs for the modalities given; a tower whose input is None does not run."""
        out = {}
        if images is not None:
            out["image_emb"] = self.encode_image(images)
        if tokens is not None:
            out["text_emb"] = self.encode_text(tokens)
        # Clamped like open_clip (logit_scale.clamp(0, ln 100)), applied on the way out.
        out["logit_scale"] = jnp.exp(jnp.clip(self.logit_scale, 0.0, math.log(self.max_logit_scale)))
        if self.logit_bias_init is not None:
            out["logit_bias"] = self.logit_bias
        return out


def build_model(model_config: ml_collections.ConfigDict) -> TwoTower:
    """Builds the two-tower model from ``config.model`` (sizes by name, any field overridable)."""
    dtype = DTYPES[model_config.get("dtype", "float32")]
    remat = bool(model_config.get("remat", False))
    pooled = bool(model_config.get("pooled_last_block", True))
    icfg, tcfg = model_config.image, model_config.text
    isize = sizes.vit_size(icfg.size)
    patch = icfg.get("patch_size") or isize.patch_size
    image = VisionTransformer(
        patch_size=int(patch), pooling=icfg.get("pooling", "cls"), pooled_last_block=pooled, remat=remat, dtype=dtype,
        act=icfg.get("act", "gelu"), layer_scale_init=float(icfg.get("layer_scale_init", 0.0)),
        patch_bias=bool(icfg.get("patch_bias", True)), ln_pre=bool(icfg.get("ln_pre", True)),
        mean=tuple(float(v) for v in icfg.get("mean", (0.5,) * 3)), std=tuple(float(v) for v in icfg.get("std", (0.5,) * 3)),
        conv_stem=tuple(int(c) for c in icfg.get("conv_stem", ())),
        **sizes.resolve(isize, icfg)
    )
    text = TextTransformer(
        vocab_size=int(tcfg.vocab_size), context_length=int(tcfg.context_length),
        causal=bool(tcfg.get("causal", True)), pooling=tcfg.get("pooling", "eot"), pooled_last_block=pooled, remat=remat,
        dtype=dtype, act=tcfg.get("act", "gelu"), layer_scale_init=float(tcfg.get("layer_scale_init", 0.0)),
        **sizes.resolve(sizes.text_size(tcfg.size), tcfg),
    )
    bias = model_config.get("logit_bias_init")
    return TwoTower(
        image=image, text=text, embed_dim=int(model_config.embed_dim),
        logit_scale_init=float(model_config.get("logit_scale_init", math.log(1 / 0.07))),
        logit_bias_init=None if bias is None else float(bias),
        max_logit_scale=float(model_config.get("max_logit_scale", 100.0)), dtype=dtype,
    )


def init_inputs(model_config: ml_collections.ConfigDict, batch_size: int = 1) -> dict[str, np.ndarray]:
    """Placeholder 'image' and 'text' inputs with the model's shapes (for ``model.init`` and shapes)."""
    model_fields = {
        fields.IMAGE: fields.image_field(int(model_config.image.image_size)),
        fields.TEXT: fields.text_field(int(model_config.text.context_length)),
    }
    return fields.zeros_batch(model_fields, batch_size)
