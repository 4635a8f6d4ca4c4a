"""Float64 NumPy transcription of Lloyd's algorithm, the oracle of the k-means tests.

Each iteration: every point goes to its nearest centre (squared euclidean; for ``cosine``, the largest dot
product with unit centres; ties to the lower id, as ``argmin``), every non-empty centre becomes the mean of
its points (``cosine``: then unit length), and empty centres are re-seeded as faiss's ``split_clusters``
does, taken deterministically: the i-th empty cluster (by id) takes the i-th largest cluster (by size, lower
id first) c as c (1 + s/1024) and leaves it c (1 - s/1024), with s = +1, -1, +1, ... over the dimensions.
After the iterations, the points are assigned to the final centres.
"""
import numpy as np


def nearest(x: np.ndarray, c: np.ndarray, metric: str) -> np.ndarray:
    if metric == "cosine":
        return np.argmax(x @ c.T, axis=1)
    return np.argmin(((x[:, None, :] - c[None, :, :]) ** 2).sum(-1), axis=1)


def _unit(c: np.ndarray) -> np.ndarray:
    return c / np.linalg.norm(c, axis=1, keepdims=True)


def lloyd(points: np.ndarray, init: np.ndarray, num_iters: int, metric: str = "euclidean"):
    """(centres [k, D] float64, assignments [N], sizes [k]) after ``num_iters`` iterations."""
    x = np.asarray(points, np.float64)
    c = np.asarray(init, np.float64).copy()
    k, d = c.shape
    if metric == "cosine":
        c = _unit(c)
    for _ in range(num_iters):
        a = nearest(x, c, metric)
        sizes = np.bincount(a, minlength=k)
        new = c.copy()
        for j in range(k):
            if sizes[j]:
                new[j] = x[a == j].mean(0)
        if metric == "cosine":
            new = _unit(new)
        empty = [j for j in range(k) if sizes[j] == 0]
        donors = sorted(range(k), key=lambda j: (-sizes[j], j))
        signs = np.where(np.arange(d) % 2 == 0, 1.0, -1.0)
        for e, donor in zip(empty, donors):
            base = new[donor].copy()
            new[e] = base * (1 + signs / 1024)
            new[donor] = base * (1 - signs / 1024)
        if metric == "cosine":
            new = _unit(new)
        c = new
    a = nearest(x, c, metric)
    return c, a, np.bincount(a, minlength=k)
