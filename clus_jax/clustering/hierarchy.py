"""Two-level clustering (MoDE's hierarchy): k-means of the points into m fine centres, then k-means of the
fine centres into n coarse ones. Plain, each fine centre belongs to the coarse centre nearest to it;
balanced (``balanced_coarse``, MoDE's coarse step: balanced k-means on the fine centres), every coarse centre
gets m / n fine ones, so with a balanced fine level every coarse cluster holds N / n points."""
from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import numpy as np
from jax.sharding import Mesh

from clus_jax.clustering.kmeans import kmeans


@dataclasses.dataclass
class TwoLevelResult:
    """fine_centers [m, D]; coarse_centers [n, D]; fine_to_coarse [m] int32; fine_assignments [N] int32.
    A point's coarse cluster is ``fine_to_coarse[fine_assignments]``."""
    fine_centers: np.ndarray
    coarse_centers: np.ndarray
    fine_to_coarse: np.ndarray
    fine_assignments: np.ndarray


def two_level(points: np.ndarray | Iterable[np.ndarray], m: int, n: int, *, balanced: bool = False,
              metric: str = "euclidean", num_iters: int = 20, coarse_iters: int | None = None, init="random",
              seed: int = 0, mesh: Mesh | None = None, checkpoint_dir: str | None = None,
              progress=None, balanced_coarse: bool = False) -> TwoLevelResult:
    """Fine k-means (``balanced`` as in MoDE's fine level) then k-means of the fine centres (``balanced_coarse``:
    m / n fine centres each, m divisible by n; ``coarse_iters``, default ``num_iters``). ``checkpoint_dir``
    checkpoints the fine level, the long one."""
    if not 1 <= n <= m:
        raise ValueError(f"two_level needs 1 <= n <= m; got m={m}, n={n}")
    if balanced_coarse and m % n:
        raise ValueError(f"a balanced coarse level needs the m={m} fine centres to divide into n={n} equal groups")
    fine = kmeans(points, m, num_iters=num_iters, metric=metric, init=init, seed=seed, mesh=mesh,
                  balanced=balanced, checkpoint_dir=checkpoint_dir, progress=progress)
    coarse = kmeans(fine.centers, n, num_iters=num_iters if coarse_iters is None else coarse_iters,
                    metric=metric, init=init if isinstance(init, str) else "random", seed=seed + 1,
                    balanced=balanced_coarse)
    return TwoLevelResult(fine_centers=fine.centers, coarse_centers=coarse.centers,
                          fine_to_coarse=coarse.assignments.astype(np.int32),
                          fine_assignments=fine.assignments.astype(np.int32))
