"""Float64 NumPy transcriptions of open_clip's ``ClipLoss`` and ``SigLipLoss``, with hand-derived gradients.

Written from the published formulas (``ClipLoss``: mean of the two cross-entropies with labels = arange(B);
``SigLipLoss``: -sum(logsigmoid(labels * logits)) / B with labels = 2 * eye - 1), so none of them calls the
code under test. Nothing here calls clus_jax.
"""
from __future__ import annotations

import numpy as np


def logsumexp(x, axis):
    m = x.max(axis=axis, keepdims=True)
    return (m + np.log(np.exp(x - m).sum(axis=axis, keepdims=True))).squeeze(axis)


def softmax(x, axis):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def clip_loss_numpy(img, txt, scale):
    """open_clip ``ClipLoss`` on one process: (CE(image->text) + CE(text->image)) / 2."""
    img, txt = np.asarray(img, np.float64), np.asarray(txt, np.float64)
    s = scale * img @ txt.T
    i2t = np.mean(logsumexp(s, 1) - np.diag(s))
    t2i = np.mean(logsumexp(s, 0) - np.diag(s))
    return (i2t + t2i) / 2


def clip_loss_grads_numpy(img, txt, scale):
    """dL/dimg = s/(2B) (P Y + Q Y - 2Y) with P row-softmax, Q column-softmax of the logits."""
    img, txt = np.asarray(img, np.float64), np.asarray(txt, np.float64)
    b = img.shape[0]
    s = scale * img @ txt.T
    p, q = softmax(s, 1), softmax(s, 0)
    g_img = scale / (2 * b) * (p @ txt + q @ txt - 2 * txt)
    g_txt = scale / (2 * b) * (p.T @ img + q.T @ img - 2 * img)
    return g_img, g_txt


def siglip_loss_numpy(img, txt, scale, bias):
    """open_clip ``SigLipLoss`` on one process: -sum(log sigmoid(labels * logits)) / B."""
    img, txt = np.asarray(img, np.float64), np.asarray(txt, np.float64)
    z = scale * img @ txt.T + bias
    labels = 2 * np.eye(len(img)) - 1
    return -np.sum(-np.logaddexp(0, -labels * z)) / len(img)


def siglip_loss_grads_numpy(img, txt, scale, bias):
    img, txt = np.asarray(img, np.float64), np.asarray(txt, np.float64)
    b = len(img)
    z = scale * img @ txt.T + bias
    labels = 2 * np.eye(b) - 1
    dz = -labels / (1 + np.exp(labels * z)) / b  # d/dz of -log sigmoid(l z) / B
    return scale * dz @ txt, scale * dz.T @ img
