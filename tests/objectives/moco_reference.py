"""Float64 NumPy transcriptions of MoCo's InfoNCE and BriVL's cross-modal loss, with hand-derived gradients.

Written from facebookresearch/moco ``moco/builder.py`` (``MoCo.forward``, ``_dequeue_and_enqueue``,
``_momentum_update_key_encoder``) and BAAI-WuDao/BriVL ``BriVL-code-inference/models/vl_model.py``
(``VL_model.forward``: image->text plus text->image, optional multi-label positives). Queues are stored as
[K, D] rows here (MoCo keeps [D, K]). Nothing here calls clus_jax: these are the oracles of
``tests/objectives/test_moco.py``.
"""
from __future__ import annotations

import numpy as np


def _f64(*xs):
    return [np.asarray(x, np.float64) for x in xs]


def log_softmax(x):
    m = x.max(axis=1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=1, keepdims=True))


def moco_logits_numpy(q, k, queue, temperature):
    """MoCo: ``l_pos = einsum('nc,nc->n', q, k)[:, None]``, ``l_neg = q @ queue.T``, ``cat([l_pos, l_neg]) / T``."""
    q, k, queue = _f64(q, k, queue)
    l_pos = np.einsum("nc,nc->n", q, k)[:, None]
    l_neg = q @ queue.T
    return np.concatenate([l_pos, l_neg], axis=1) / temperature


def positives_numpy(batch, queue_length, extra=None):
    """[B, 1 + K] bool: column 0 (the key) plus any extra queue positives ([B, K] bool)."""
    pos = np.zeros((batch, 1 + queue_length), bool)
    pos[:, 0] = True
    if extra is not None:
        pos[:, 1:] = extra
    return pos


def info_nce_numpy(q, k, queue, temperature, extra=None):
    """Sum over the positives of -log_softmax(logits), divided by B; without extras MoCo's CE with label 0."""
    logits = moco_logits_numpy(q, k, queue, temperature)
    pos = positives_numpy(len(logits), logits.shape[1] - 1, extra)
    return float(-np.sum(np.where(pos, log_softmax(logits), 0.0)) / len(logits))


def info_nce_grad_numpy(q, k, queue, temperature, extra=None):
    """dL/dq (unit queries): dL/dlogits = (|P_b| softmax_b - 1_{P_b}) / B, then / T through the dot products."""
    k, queue = _f64(k, queue)
    logits = moco_logits_numpy(q, k, queue, temperature)
    batch = len(logits)
    pos = positives_numpy(batch, logits.shape[1] - 1, extra)
    g = (pos.sum(axis=1, keepdims=True) * np.exp(log_softmax(logits)) - pos) / batch / temperature
    return g[:, :1] * k + g[:, 1:] @ queue


def normalize_numpy(x):
    x = np.asarray(x, np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def normalize_backward_numpy(x, dq):
    """Gradient through q = x / |x|: dx = (dq - q (q . dq)) / |x|."""
    x, dq = _f64(x, dq)
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    q = x / norm
    return (dq - q * np.sum(q * dq, axis=-1, keepdims=True)) / norm


def topk_mask_numpy(keys, queue, topk):
    """[B, K] bool: queue item j is among the ``topk`` largest of ``keys[b] . queue``."""
    sims = np.asarray(keys, np.float64) @ np.asarray(queue, np.float64).T
    mask = np.zeros(sims.shape, bool)
    order = np.argsort(-sims, axis=1)[:, :topk]
    np.put_along_axis(mask, order, True, axis=1)
    return mask


def multi_label_mask_numpy(image_k, text_k, image_queue, text_queue, topk):
    """BriVL's false-negative mask: j in topk(text_k[b] . text_queue) and in topk(image_k[b] . image_queue)."""
    return topk_mask_numpy(text_k, text_queue, topk) & topk_mask_numpy(image_k, image_queue, topk)


def brivl_loss_numpy(image_q, text_q, image_k, text_k, image_queue, text_queue, temperature, topk=0):
    """(loss, i2t, t2i): ``loss = t2i + i2t``; i2t scores image_q against [text_k, text_queue], t2i text_q
    against [image_k, image_queue]; with topk > 0 both directions share the multi-label mask."""
    mask = multi_label_mask_numpy(image_k, text_k, image_queue, text_queue, topk) if topk else None
    i2t = info_nce_numpy(image_q, text_k, text_queue, temperature, mask)
    t2i = info_nce_numpy(text_q, image_k, image_queue, temperature, mask)
    return i2t + t2i, i2t, t2i


def brivl_loss_grads_numpy(image_q, text_q, image_k, text_k, image_queue, text_queue, temperature, topk=0):
    """(dL/dimage_q, dL/dtext_q) of ``brivl_loss_numpy`` (each query appears in one direction only)."""
    mask = multi_label_mask_numpy(image_k, text_k, image_queue, text_queue, topk) if topk else None
    return (info_nce_grad_numpy(image_q, text_k, text_queue, temperature, mask),
            info_nce_grad_numpy(text_q, image_k, image_queue, temperature, mask))


def enqueue_numpy(queue, ptr, keys):
    """MoCo ``_dequeue_and_enqueue``: ``queue[ptr:ptr + B] = keys; ptr = (ptr + B) % K`` (K a multiple of B)."""
    queue = np.array(queue, copy=True)
    batch = len(keys)
    assert len(queue) % batch == 0
    queue[ptr:ptr + batch] = keys
    return queue, (ptr + batch) % len(queue)


def momentum_update_numpy(param_k, param_q, m):
    """MoCo ``_momentum_update_key_encoder`` for one leaf: ``param_k = param_k * m + param_q * (1 - m)``."""
    return param_k * m + param_q * (1.0 - m)
