"""Analytic model FLOPs of a train step, for MFU (maxtext's method: count the matmuls, not the hardware).

Counted: every matrix product of the forward pass of both towers (patch embedding, QKV / output / MLP
projections, the two attention products QK^T and AV, pooling heads, the projections to the shared
embedding) and of the objectives (each declares its own: the [B, B] logits of contrastive losses, the
[B, K] prototype scores of clustering losses), at 2 FLOPs per multiply-add. A train step is 3x the forward (the backward pass does
two products per forward product). Not counted: embedding lookups, normalisations, activations,
softmaxes and the optimizer, which are memory-bound and small next to the matmuls.

``causal_attention_factor`` scales the attention products of the causal text tower: 0.5 counts only the
unmasked half (maxtext's MFU convention, the default of ``train_step_flops``); 1.0 counts the full
product, which is what XLA executes and what ``compiled.cost_analysis()`` reports.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from clus_jax.models import sizes


@dataclasses.dataclass(frozen=True)
class TowerShape:
    """What the FLOP count of one transformer tower depends on."""

    tokens: int
    width: int
    depth: int
    mlp_dim: int
    causal: bool = False
    pooled_last: bool = False  # the last block computes only the pooled token (``model.pooled_last_block``)


def config_value(cfg: Mapping[str, Any], key: str, default: Any = None) -> Any:
    value = cfg.get(key, default) if hasattr(cfg, "get") else getattr(cfg, key, default)
    return default if value is None else value


def block_forward_flops(t: TowerShape, causal_attention_factor: float = 1.0) -> dict[str, float]:
    """Per-example forward FLOPs of ``t.depth`` pre-LN blocks: {'dense': ..., 'attention': ...}.

    With ``t.pooled_last`` the last block computes keys and values for every token but the query, the
    attention row, the output projection and the MLP for the pooled token only.
    """
    w, m, n = t.width, t.mlp_dim, t.tokens
    dense = 2 * n * (3 * w * w + w * w + 2 * w * m)  # QKV, output projection, two MLP layers
    attention = 2 * 2 * n * n * w  # QK^T and AV over all heads
    if t.causal:
        attention *= causal_attention_factor
    if not t.pooled_last:
        return {"dense": float(t.depth * dense), "attention": float(t.depth * attention)}
    last_dense = 2 * (2 * n * w * w + w * w + w * w + 2 * w * m)  # K, V of all tokens; Q, output, MLP of one
    last_attention = 2 * 2 * n * w  # one query row against all keys
    return {"dense": float((t.depth - 1) * dense + last_dense),
            "attention": float((t.depth - 1) * attention + last_attention)}


def image_tower(model_config: Mapping[str, Any]) -> tuple[TowerShape, int, int, str]:
    """(blocks, patch-embedding input width, number of patches, pooling) of ``config.model.image``."""
    icfg = model_config["image"]
    size = sizes.vit_size(config_value(icfg, "size"))
    r = sizes.resolve(size, icfg)
    patch = int(config_value(icfg, "patch_size") or size.patch_size)
    image_size = int(config_value(icfg, "image_size"))
    patches = (image_size // patch) ** 2
    pooling = config_value(icfg, "pooling", "cls")
    tokens = patches + (1 if pooling == "cls" else 0)
    pooled_last = pooling == "cls" and bool(config_value(model_config, "pooled_last_block", True))
    stem = _conv_stem(icfg)
    channels = stem[-1] if stem else 3
    p = patch // 2 ** len(stem)
    return TowerShape(tokens, r["width"], r["depth"], r["mlp_dim"], pooled_last=pooled_last), p * p * channels, patches, pooling


def _conv_stem(icfg: Mapping[str, Any]) -> tuple[int, ...]:
    """The channels of ``config.model.image.conv_stem`` (() without a stem)."""
    return tuple(int(c) for c in config_value(icfg, "conv_stem", ()) or ())


def conv_stem_flops(model_config: Mapping[str, Any]) -> float:
    """Forward FLOPs of the image tower's convolutional stem (3x3 stride-2 convolutions) on one image."""
    icfg = model_config["image"]
    side, c_in, total = int(config_value(icfg, "image_size")), 3, 0.0
    for c_out in _conv_stem(icfg):
        side = -(-side // 2)  # SAME padding, stride 2
        total += 2.0 * side * side * 9 * c_in * c_out
        c_in = c_out
    return total


def text_tower(model_config: Mapping[str, Any]) -> TowerShape:
    tcfg = model_config["text"]
    r = sizes.resolve(sizes.text_size(config_value(tcfg, "size")), tcfg)
    pooled_last = config_value(tcfg, "pooling", "eot") == "eot" and bool(config_value(model_config, "pooled_last_block", True))
    return TowerShape(int(config_value(tcfg, "context_length")), r["width"], r["depth"], r["mlp_dim"],
                      causal=bool(config_value(tcfg, "causal", True)), pooled_last=pooled_last)


def forward_flops_per_example(model_config: Mapping[str, Any], causal_attention_factor: float = 1.0) -> dict[str, float]:
    """Forward matmul FLOPs of one (image, text) pair, by part; 'total' sums them."""
    img, patch_dim, patches, pooling = image_tower(model_config)
    txt = text_tower(model_config)
    embed = int(config_value(model_config, "embed_dim"))
    ib = block_forward_flops(img)
    tb = block_forward_flops(txt, causal_attention_factor)
    parts = {
        "image_stem": conv_stem_flops(model_config),
        "image_patch_embed": 2.0 * patches * patch_dim * img.width,
        "image_dense": ib["dense"],
        "image_attention": ib["attention"],
        "image_pool": 0.0,
        "image_proj": 2.0 * img.width * embed,
        "text_dense": tb["dense"],
        "text_attention": tb["attention"],
        "text_proj": 2.0 * txt.width * embed,
    }
    if pooling == "map":
        w, m, n = img.width, img.mlp_dim, img.tokens
        # probe query, keys and values of all tokens, 1 x n attention, output projection, MLP on the probe
        parts["image_pool"] = 2.0 * (w * w + n * 2 * w * w + 2 * n * w + w * w + 2 * w * m)
    parts["total"] = sum(parts.values())
    return parts


def towers_forward_flops(config: Mapping[str, Any], batch_size: int, modalities: tuple[str, ...] = ("image", "text"),
                         causal_attention_factor: float = 0.5) -> float:
    """Forward matmul FLOPs of the towers in ``modalities`` on a batch (e.g. a teacher's copy of them)."""
    parts = forward_flops_per_example(config["model"], causal_attention_factor)
    return batch_size * sum(v for k, v in parts.items() if k != "total" and k.split("_")[0] in modalities)
