"""Synthetic image-caption pairs, so the trainer can run with no data on disk (``source='synthetic'``).

Each example is a coloured shape on a coloured background with a caption that describes it, e.g.
"a red circle on a blue background". Everything is a pure function of (seed, index), so the source is
deterministic, picklable and needs no files. The captions are learnable from the pixels, which makes
this source useful for smoke tests of the whole training loop.
"""
from __future__ import annotations

import numpy as np

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "purple": (140, 60, 180),
    "orange": (245, 140, 30),
    "black": (20, 20, 20),
    "white": (245, 245, 245),
}
SHAPES = ("square", "circle", "triangle")
_TEMPLATES = (
    "a {fg} {shape} on a {bg} background",
    "a {fg} {shape}",
    "{fg} {shape}, {bg} background",
)


class SyntheticSource:
    """Random-access source of ``{'image': uint8 [S, S, 3], 'caption': str, 'label': int}``.

    ``label`` is ``color_index * len(SHAPES) + shape_index`` of the foreground shape.
    """

    def __init__(self, size: int = 10_000, *, image_size: int = 64, seed: int = 0):
        if size <= 0:
            raise ValueError(f"synthetic size must be positive, got {size}")
        self._size = int(size)
        self._image_size = int(image_size)
        self._seed = int(seed) & ((1 << 64) - 1)
        yy, xx = np.mgrid[0:self._image_size, 0:self._image_size]
        self._yy, self._xx = yy.astype(np.float32), xx.astype(np.float32)

    def __len__(self) -> int:
        return self._size

    def __repr__(self) -> str:
        return f"SyntheticSource(size={self._size}, image_size={self._image_size}, seed={self._seed})"

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        if not 0 <= index < self._size:
            raise IndexError(f"index {index} out of range for SyntheticSource of size {self._size}")
        rng = np.random.default_rng([self._seed, index])
        names = list(COLORS)
        fg_i, bg_i = rng.choice(len(names), size=2, replace=False)
        shape_i = int(rng.integers(len(SHAPES)))
        s = self._image_size
        radius = rng.uniform(0.18, 0.38) * s
        cx, cy = rng.uniform(radius, s - radius, size=2)
        xx, yy = self._xx, self._yy
        shape = SHAPES[shape_i]
        if shape == "square":
            mask = (np.abs(xx - cx) <= radius) & (np.abs(yy - cy) <= radius)
        elif shape == "circle":
            mask = (xx - cx) ** 2 + (yy - cy) ** 2 <= radius ** 2
        else:
            top, bottom = cy - radius, cy + radius
            half_width = (yy - top) / (2 * radius) * radius
            mask = (yy >= top) & (yy <= bottom) & (np.abs(xx - cx) <= half_width)
        image = np.empty((s, s, 3), np.uint8)
        image[...] = COLORS[names[bg_i]]
        image[mask] = COLORS[names[fg_i]]
        noise = rng.integers(-12, 13, size=image.shape)
        image = np.clip(image.astype(np.int16) + noise, 0, 255).astype(np.uint8)
        template = _TEMPLATES[int(rng.integers(len(_TEMPLATES)))]
        caption = template.format(fg=names[fg_i], shape=shape, bg=names[bg_i])
        return {"image": image, "caption": caption, "label": int(fg_i) * len(SHAPES) + shape_i}
