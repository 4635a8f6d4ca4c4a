"""k-means centres for ``config.mlcd.init_centers``: a ``.npy`` of [K, D] or a clustering output directory.

A directory is a ``python -m clus_jax.cluster --out DIR`` output, whose centres are ``side_fields.CENTERS_FILE``
(``centers.npy``). A directory without it may hold ``centroids.npy`` instead, read for compatibility with
outputs that use that name.
"""
from __future__ import annotations

import os

import numpy as np

from clus_jax.data.side_fields import CENTERS_FILE

#: File names read from a clustering output directory, in this order.
CENTERS_FILES = (CENTERS_FILE, "centroids.npy")


def centers_file(path: str) -> str:
    """The .npy of a ``config.mlcd.init_centers`` path: the file itself or a clustering output directory's."""
    if os.path.isdir(path):
        for name in CENTERS_FILES:
            if os.path.isfile(os.path.join(path, name)):
                return os.path.join(path, name)
        raise FileNotFoundError(f"directory {path!r} holds none of {list(CENTERS_FILES)}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path!r} does not exist")
    return path


def centers_shape(path: str) -> tuple[int, ...]:
    """The shape of the centres at ``path`` (file or directory), read without loading them."""
    return tuple(np.load(centers_file(path), mmap_mode="r").shape)


def load_centers(path: str) -> np.ndarray:
    """k-means centres [K, D] from ``path`` as float32 unit rows (the classifier starts on the sphere)."""
    x = np.asarray(np.load(centers_file(path)), np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
