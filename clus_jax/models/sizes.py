"""Named model sizes, so a config says 'B/16' instead of repeating widths and depths.

Image towers follow the ViT family (Dosovitskiy et al.; Zhai et al.), text towers follow CLIP's text
Transformer. Any field can be overridden in the config (e.g. ``depth=6``) without new code.
"""
from __future__ import annotations

import dataclasses
import re

# name -> (width, depth, heads, mlp_dim). 'mu' and 'nano' are this project's CPU towers, not ViT sizes. The
# nano towers (the default run's) have an image MLP of 2x the width and two text blocks: against 4x and four
# blocks they take a third off the FLOPs per image at the same easy-VQA zero-shot (BENCHMARKS.md, "The
# default run at a third of the compute").
VIT_SIZES: dict[str, tuple[int, int, int, int]] = {
    "mu": (64, 2, 2, 256),
    "nano": (128, 4, 4, 256),
    "tiny": (192, 12, 3, 768),
    "small": (384, 12, 6, 1536),
    "base": (768, 12, 12, 3072),
    "large": (1024, 24, 16, 4096),
    "huge": (1280, 32, 16, 5120),
}
TEXT_SIZES: dict[str, tuple[int, int, int, int]] = {
    "mu": (64, 2, 2, 256),
    "nano": (128, 2, 4, 512),
    "tiny": (192, 6, 3, 768),
    "small": (256, 6, 4, 1024),
    "base": (512, 12, 8, 2048),
    "large": (768, 12, 12, 3072),
    "huge": (1024, 24, 16, 4096),
}
_SHORT = {"Mu": "mu", "N": "nano", "Ti": "tiny", "S": "small", "B": "base", "L": "large", "H": "huge"}


@dataclasses.dataclass(frozen=True)
class TransformerSize:
    width: int
    depth: int
    heads: int
    mlp_dim: int
    patch_size: int | None = None


def _lookup(table: dict, name: str, kind: str) -> tuple[int, int, int, int]:
    key = _SHORT.get(name, name.lower())
    if key not in table:
        raise KeyError(f"unknown {kind} size {name!r}; known: {sorted(table)} or {sorted(_SHORT)}")
    return table[key]


def vit_size(name: str) -> TransformerSize:
    """'B/16' -> base width/depth/heads with patch 16; 'tiny' -> tiny without a patch size."""
    match = re.fullmatch(r"([A-Za-z]+)(?:/(\d+))?", name)
    if not match:
        raise KeyError(f"unknown image size {name!r}; use e.g. 'B/16', 'tiny' or 'S/8'")
    width, depth, heads, mlp = _lookup(VIT_SIZES, match.group(1), "image")
    patch = int(match.group(2)) if match.group(2) else None
    return TransformerSize(width, depth, heads, mlp, patch)


def text_size(name: str) -> TransformerSize:
    return TransformerSize(*_lookup(TEXT_SIZES, name, "text"))


def resolve(size: TransformerSize, overrides) -> dict[str, int]:
    """width, depth, heads and mlp_dim of ``size``, each replaced by a nonzero value of ``overrides``.

    ``overrides`` is a tower's config node (``config.model.image`` or ``.text``: a ConfigDict or dict).
    """
    return {f: int(overrides.get(f) or getattr(size, f)) for f in ("width", "depth", "heads", "mlp_dim")}
