"""The result of a k-means run, plain or balanced (one type, so ``kmeans`` and ``balanced`` need not import each other)."""
from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass
class KMeansResult:
    """centres [k, D] float32; assignments [N] int32 (nearest centre of each point, in stream order);
    inertia: mean squared distance to the assigned centre; sizes [k] int64; num_iters_run."""
    centers: np.ndarray
    assignments: np.ndarray
    inertia: float
    sizes: np.ndarray
    num_iters_run: int
