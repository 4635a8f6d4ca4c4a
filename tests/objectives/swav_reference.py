"""Plain NumPy transcriptions of SwAV's Sinkhorn-Knopp and two-view swapped-prediction loss, line by line.

Not used in training: they are the independent references that the tests check the jitted, sharded code
against (in float64) and that ``bench/sinkhorn.py`` times the jitted code against (in float32). Nothing
here calls clus_jax.
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


def logdomain_sinkhorn_numpy(out, epsilon: float, num_iters: int) -> np.ndarray:
    """The same iteration on float64 log-potentials, for inputs whose kernel underflows even in float64."""

    def lse(x, axis):
        m = x.max(axis=axis, keepdims=True)
        return m + np.log(np.exp(x - m).sum(axis=axis, keepdims=True))

    logits = np.asarray(out, np.float64) / epsilon
    B, K = logits.shape
    log_q = logits - lse(logits, (0, 1))
    for _ in range(num_iters):
        log_q = log_q - lse(log_q, 0) - np.log(K)
        log_q = log_q - lse(log_q, 1) - np.log(B)
    return np.exp(log_q + np.log(B))


def log_softmax_numpy(x, dtype=np.float64) -> np.ndarray:
    """Max-shifted log-softmax over the last axis of a 2-D array."""
    x = np.asarray(x, dtype)
    shifted = x - x.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def swav_loss_numpy(scores_a, scores_b, temperature, epsilon, num_iters, codes_a=None, codes_b=None):
    """SwAV ``main_swav.py`` with two crops, both used for assignment: mean over the two swapped CEs.

    Returns (loss, codes_a, codes_b) in float64; given codes replace the Sinkhorn codes of that view.
    """
    q_a = swav_sinkhorn_numpy(scores_a, epsilon, num_iters) if codes_a is None else np.asarray(codes_a, np.float64)
    q_b = swav_sinkhorn_numpy(scores_b, epsilon, num_iters) if codes_b is None else np.asarray(codes_b, np.float64)
    loss = 0.0
    for q, other in ((q_a, scores_b), (q_b, scores_a)):
        loss -= np.mean(np.sum(q * log_softmax_numpy(np.asarray(other, np.float64) / temperature), axis=1))
    return loss / 2, q_a, q_b


def swav_loss_grad_numpy(scores_a, scores_b, temperature, q_a, q_b):
    """d loss / d scores with codes held fixed: (softmax(s / tau) * sum_k q - q) / (2 tau B), derived by hand."""
    batch = scores_a.shape[0]

    def grad(scores, q):
        p = np.exp(log_softmax_numpy(np.asarray(scores, np.float64) / temperature))
        return (p * q.sum(axis=1, keepdims=True) - q) / (2 * temperature * batch)

    return grad(scores_a, q_b), grad(scores_b, q_a)
