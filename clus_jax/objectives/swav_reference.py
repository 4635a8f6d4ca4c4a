"""Plain NumPy transcriptions of SwAV's Sinkhorn-Knopp and of a log-softmax, line by line.

Not used in training: they are the independent references that the tests check the jitted, sharded code
against (in float64) and that ``bench/sinkhorn.py`` times the jitted code against (in float32).
"""
from __future__ import annotations

import numpy as np


def swav_sinkhorn_numpy(out, epsilon: float, num_iters: int, dtype=np.float64, max_shift: bool = False) -> np.ndarray:
    """SwAV's ``distributed_sinkhorn`` on one process with its in-place updates; (B, K) codes in ``dtype``.

    ``max_shift`` subtracts the global maximum before ``exp`` (SwAV's former
    ``improve_numerical_stability`` option); the first global normalisation cancels it.
    """
    logits = np.asarray(out, dtype) / epsilon
    if max_shift:
        logits = logits - logits.max()
    Q = np.exp(logits).T
    B = Q.shape[1]
    K = Q.shape[0]
    Q /= np.sum(Q)
    for _ in range(num_iters):
        Q /= np.sum(Q, axis=1, keepdims=True)
        Q /= K
        Q /= np.sum(Q, axis=0, keepdims=True)
        Q /= B
    Q *= B
    return Q.T


def log_softmax_numpy(x, dtype=np.float64) -> np.ndarray:
    """Max-shifted log-softmax over the last axis of a 2-D array."""
    x = np.asarray(x, dtype)
    shifted = x - x.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
