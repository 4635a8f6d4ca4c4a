"""Float64 NumPy transcriptions of UNICOM's margin softmax and of MLCD's loss (Eq. 5), with hand-derived gradients.

UNICOM: deepglint/unicom ``unicom/partial_fc.py``, one process, every centre scored (sample_rate 1):
``PartialFC_V2.forward`` (``normalize`` both sides, ``linear``, ``clamp(-1, 1)``), ``CombinedMarginLoss.forward``
(ArcFace: under ``torch.no_grad`` ``arccos`` of every logit, ``+ m2`` on the target, ``cos``, then ``* s``;
CosFace: ``target - m3``, then ``* s``) and ``DistCrossEntropyFunc`` (forward: max-shifted softmax, target
probability, ``clamp_min_(1e-30).log_().mean() * -1``; backward: ``(softmax - onehot) / batch``).
MLCD: An et al. ECCV 2024, Eq. 5, ``log(1 + sum_P exp(-s_i)) + log(1 + sum_N exp(s_j))`` with
``s_i = s cos(theta_i + m)`` and ``s_j = s cos(theta_j)``, batch mean, the margin straight-through as unicom's.

Nothing here calls clus_jax: these are the oracles of ``tests/objectives/test_mlcd.py``.
"""
from __future__ import annotations

import numpy as np


def normalize(x, eps=1e-12):
    """``torch.nn.functional.normalize``: x / max(|x|, eps) over the last axis."""
    x = np.asarray(x, np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), eps)


def normalize_backward(x, d):
    """Gradient through ``x / |x|`` (|x| > eps): (d - x_hat (x_hat . d)) / |x|."""
    x, d = np.asarray(x, np.float64), np.asarray(d, np.float64)
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    x_hat = x / norm
    return (d - x_hat * np.sum(x_hat * d, axis=-1, keepdims=True)) / norm


def cosines(embeddings, centers):
    """(clamped cosines [B, C], the clamp's gradient mask): ``linear(normalize(e), normalize(w)).clamp(-1, 1)``."""
    raw = normalize(embeddings) @ normalize(centers).T
    return np.clip(raw, -1.0, 1.0), (raw >= -1.0) & (raw <= 1.0)


def combined_margin(cos, labels, s, m2, m3):
    """``CombinedMarginLoss.forward`` with m1 = 1: ArcFace (m3 = 0) or CosFace (m3 > 0); returns the logits."""
    logits = np.array(cos, copy=True)
    rows = np.arange(len(labels))
    target = logits[rows, labels].copy()
    if m3 == 0.0:
        target = np.arccos(target)  # target_logit.arccos_()
        logits = np.arccos(logits)  # logits.arccos_()
        logits[rows, labels] = target + m2
        logits = np.cos(logits)  # logits.cos_()
    else:
        logits[rows, labels] = target - m3
    return logits * s


def dist_cross_entropy(logits, labels):
    """(loss, softmax): ``DistCrossEntropyFunc.forward`` on one process."""
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    p = e / e.sum(axis=1, keepdims=True)
    target = p[np.arange(len(labels)), labels]
    return float(-np.mean(np.log(np.maximum(target, 1e-30)))), p


def margin_softmax_numpy(embeddings, labels, centers, s, m2, m3=0.0):
    """(loss, dL/dembeddings, dL/dcenters) of UNICOM's loss on raw embeddings [B, D] and centres [C, D].

    Backward, by hand: dL/dlogits = (softmax - onehot) / B (the custom backward, whatever the clamp did);
    the margin is not differentiated (``no_grad``), so dL/dcos = s dL/dlogits, times the clamp's mask; then
    through the dot products and both normalisations.
    """
    labels = np.asarray(labels)
    cos, inside = cosines(embeddings, centers)
    loss, p = dist_cross_entropy(combined_margin(cos, labels, s, m2, m3), labels)
    onehot = np.zeros_like(p)
    onehot[np.arange(len(labels)), labels] = 1.0
    g_cos = s * (p - onehot) / len(labels) * inside
    return loss, *_through_cosines(embeddings, centers, g_cos)


def _through_cosines(embeddings, centers, g_cos):
    e_hat, w_hat = normalize(embeddings), normalize(centers)
    return normalize_backward(embeddings, g_cos @ w_hat), normalize_backward(centers, g_cos.T @ e_hat)


def _log1p_sum_exp(x):
    """log(1 + sum(exp(x))) per row over the entries that are not -inf (NumPy's logaddexp, exact in float64)."""
    out = np.zeros(len(x))
    for b, row in enumerate(x):
        out[b] = np.logaddexp.reduce(np.concatenate([[0.0], row[np.isfinite(row)]]))
    return out


def mlcd_sets(labels, num_classes, negative_mask=None):
    """([B, K] positives, [B, K] negatives): P from the non-negative labels, N = (mask or all) minus P."""
    labels = np.asarray(labels)
    pos = np.zeros((len(labels), num_classes), bool)
    for b, row in enumerate(labels):
        pos[b, row[row >= 0]] = True
    allowed = (np.ones_like(pos) if negative_mask is None
               else np.broadcast_to(np.asarray(negative_mask, bool), pos.shape))
    return pos, allowed & ~pos


def mlcd_numpy(embeddings, labels, centers, s, m, negative_mask=None):
    """(loss, dL/dembeddings, dL/dcenters) of MLCD Eq. 5 with the ArcFace margin on the positives.

    Backward, by hand, per row b (the margin straight-through): dL/dcos_i = -s exp(-s_i) / (1 + sum_P exp(-s))
    on the positives and dL/dcos_j = s exp(s_j) / (1 + sum_N exp(s)) on the negatives, each / B; then the
    clamp mask, the dot products and both normalisations.
    """
    cos, inside = cosines(embeddings, centers)
    pos, neg = mlcd_sets(labels, len(centers), negative_mask)
    s_pos = s * np.cos(np.arccos(cos) + m)
    s_neg = s * cos
    a = np.where(pos, -s_pos, -np.inf)
    n = np.where(neg, s_neg, -np.inf)
    pos_term, neg_term = _log1p_sum_exp(a), _log1p_sum_exp(n)
    loss = float(np.mean(pos_term + neg_term))
    batch = len(cos)
    g_pos = -s * np.exp(a - pos_term[:, None])  # exp(-s_i) / (1 + sum exp(-s)), 0 off the positives
    g_neg = s * np.exp(n - neg_term[:, None])
    g_cos = (g_pos + g_neg) / batch * inside
    return loss, *_through_cosines(embeddings, centers, g_cos)
