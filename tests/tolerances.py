"""Tolerances for float32 comparisons, derived from rounding-error bounds rather than read off one host.

Two float32 computations of the same quantity that differ only in the order of their sums (chunked against
unchunked, sharded against one device, micro-batched against one batch, or the same program on a processor
with another vector width) are each within the bound below of the exact value, so they are within twice
that of each other. Whether the last bit flips depends on the processor, so a tolerance one ulp wide holds
on one family and fails on another; a bound from the magnitudes involved holds on all of them.

The standard result (Higham, *Accuracy and Stability of Numerical Algorithms*, 2nd ed., Sec. 4.2): a sum of
``n`` terms in floating point, in any order, is within ``gamma(n) * sum(|terms|)`` of the exact sum, with
``gamma(n) = n u / (1 - n u)`` and ``u`` the unit roundoff (2**-24 for float32, 2**-53 for float64). A dot
product of length ``n`` obeys the same bound with ``sum(|a_k b_k|)``.

Each helper returns an absolute tolerance; each call site says which sums it covers and why its ``scale``
bounds the sum of absolute terms. Float64 comparisons that claim exactness of the algorithm use the same
formulas with ``u=U64``.
"""
from __future__ import annotations

import numpy as np

U32 = 2.0**-24  # float32 unit roundoff (half an ulp of 1.0)
U64 = 2.0**-53  # float64 unit roundoff


def gamma(n: int, u: float = U32) -> float:
    """Higham's gamma_n: the relative bound on a sum or dot product of ``n`` terms in any order."""
    assert n * u < 1, (n, u)
    return n * u / (1 - n * u)


def sum_atol(n: int, scale: float, u: float = U32) -> float:
    """|computed - exact| of an ``n``-term sum whose absolute terms add up to at most ``scale``."""
    return gamma(n, u) * scale


def reorder_atol(n: int, scale: float, u: float = U32) -> float:
    """|a - b| for two evaluations of the same ``n``-term sum in different orders: twice ``sum_atol``."""
    return 2.0 * sum_atol(n, scale, u)


def logit_relative_error(batch: int, dim: int, logit_scale: float, u: float = U32) -> float:
    """Relative error of one probability (softmax or sigmoid) of a logit ``logit_scale * <x, y>`` of unit
    vectors: the ``dim``-term dot product is off by at most ``gamma(dim)``, times s in the logit, and exp turns
    an absolute logit error into a relative one, once in the numerator and once in the normaliser's terms; the
    normaliser's sum adds ``gamma(batch)``, and the max shift, scale, exp and divide roundings ``6 u``."""
    return 2.0 * gamma(dim, u) * logit_scale + gamma(batch, u) + 6.0 * u


def logit_grad_atol(abs_term_sum: float, batch: int, dim: int, logit_scale: float, u: float = U32) -> float:
    """|a - b| for two evaluations, in any summation order, of a gradient coordinate of a loss over a
    [batch, batch] matrix of logits ``logit_scale * X Y^T``: each coordinate is a ``batch``-term sum of a
    probability times ``Y``, whose absolute terms add up to at most ``abs_term_sum`` (the call site derives
    it: ``2 s / B * max|Y|`` for the symmetric softmax cross-entropy, ``s * max|Y|`` for the sigmoid loss).
    Each term is off by ``logit_relative_error`` and the sum adds ``gamma(batch)``; twice that bounds two
    orders."""
    return 2.0 * abs_term_sum * (logit_relative_error(batch, dim, logit_scale, u) + gamma(batch, u))


def logit_loss_atol(loss_scale: float, batch: int, dim: int, logit_scale: float, weight_sum: float = 1.0,
                    n_terms: int | None = None, u: float = U32) -> float:
    """|a - b| for two evaluations of a weighted sum of ``-log p`` terms (softmax rows or sigmoid pairs) over
    the same logits: each term's log-normaliser is off by ``logit_relative_error`` (log turns relative into
    absolute) and its logit by ``gamma(dim) * s``; the terms' weights add up to ``weight_sum`` (1 for a mean
    over rows, ``B`` for SigLIP's B*B pairs over B), and the sum of ``n_terms`` terms (``2 * batch`` rows of
    a symmetric softmax by default, ``batch**2`` pairs for SigLIP) adding up to ``loss_scale`` adds
    ``gamma(n_terms) * loss_scale``. Twice that bounds two orders."""
    per_term = logit_relative_error(batch, dim, logit_scale, u) + gamma(dim, u) * logit_scale
    return 2.0 * (weight_sum * per_term + gamma(n_terms or 2 * batch, u) * loss_scale)


def perturb_last_bit(x: np.ndarray, rng: np.random.Generator, fraction: float = 0.5) -> np.ndarray:
    """``x`` with a random ``fraction`` of its float32 elements moved one ulp up or down."""
    x = np.asarray(x, np.float32)
    flip = rng.random(x.shape) < fraction
    direction = np.where(rng.random(x.shape) < 0.5, np.float32(np.inf), np.float32(-np.inf))
    return np.where(flip, np.nextafter(x, direction), x).astype(np.float32)


def network_atol(n: int, scale: float, depth: int, u: float = U32) -> float:
    """|a - b| for two evaluations, in different summation orders, of a network's output or gradient whose
    largest magnitude is ``scale``: each of ``depth`` layers on the path (blocks, embedding, head; counted
    twice for a gradient, forward and backward) adds a relative error of at most ``gamma(n)``, ``n`` the longest
    reduction anywhere in the computation; twice that for two orders. An estimate from the quantity's own
    size, not a rigorous bound (that needs every layer's condition number): layer norms and residuals keep a
    layer from amplifying its input's relative error much, and ``gamma(n)`` assumes all ``n`` roundings add
    up where mixed-sign terms give about ``sqrt(n) u`` of a sum of absolute terms about ``sqrt(n)`` times
    larger than the result."""
    return 2.0 * depth * gamma(n, u) * scale


def mean_atol(n: int, mean_abs: float, u: float = U32) -> float:
    """|computed - exact| of a mean of ``n`` terms (summed in any order, then divided by ``n``) whose absolute
    values average ``mean_abs``: ``gamma(n - 1)`` of the sum of absolute terms, plus the division's ``u``."""
    return gamma(max(n, 1), u) * mean_abs


def unit_norm_atol(dim: int, u: float = U32) -> float:
    """|‖c‖ - 1| for ``c = v / ‖v‖`` computed in float32 and measured with a float32 norm: each norm's
    ``dim``-term sum of squares is off by ``gamma(dim)``, halved by the sqrt; plus the two sqrt roundings and
    the division's."""
    return gamma(dim + 3, u)


def sq_distance_atol(dim: int, norm_x: float, norm_c: float, u: float = U32) -> float:
    """|computed - exact| of ``|x|^2 - 2 x.c + |c|^2`` (or its negation, a k-means score) in float32: the three
    ``dim``-term sums are off by ``gamma(dim)`` of ``|x|^2``, ``2|x||c|`` and ``|c|^2``, and the two
    subtractions add ``u`` each, of at most ``(|x| + |c|)^2``. It is absolute: a small distance between long
    vectors can lose all of its digits."""
    return gamma(dim + 2, u) * (norm_x + norm_c) ** 2


# One float32 computation against a float64 reference (first order in u: products of two error terms dropped).


def unit_rows_relative_error(dim: int, u: float = U32) -> float:
    """Relative error of each element of ``x / |x|`` computed from a raw row of ``dim`` elements: the sum of
    squares is off by ``gamma(dim)`` (its terms are positive), the square root halves that, and the root and
    the division round once each."""
    return gamma(dim, u) / 2 + 2 * u


def lse_rounding(n: int, size: float, u: float = U32) -> float:
    """What one max-shifted log-sum-exp over ``n`` terms adds to its inputs' errors, for arguments and result at
    most ``size`` in magnitude: subtracting the maximum rounds each term's exponent by ``u |x - m|``, weighted
    by ``e^(x - m) / sum``, at most ``min(2 size, n / e) u`` in all (``t e^-t <= 1/e``); exp and log are
    allowed 2 ulp (4u); the ``n`` positive terms add ``gamma(n)``; adding back the maximum rounds by
    ``u (size + log n)``."""
    return gamma(n, u) + u * (min(2 * size, n / np.e) + size + 5 * np.log(n) + 8)


def log_softmax_atol(n: int, logit_atol: float, max_abs_logit: float, u: float = U32) -> float:
    """|computed - exact| of ``log p_i`` of a softmax over ``n`` logits (so of a cross-entropy row ``-log p_i``),
    each logit off by at most ``logit_atol`` and at most ``max_abs_logit`` in magnitude; to first order also the
    relative error of ``p_i`` (formed as ``exp(log p_i)`` or ``e_i / sum``: 4u more, included). The logit errors
    enter twice (the entry, and the normaliser as a weighted mean of all entries' errors), plus
    ``lse_rounding`` and the subtraction's and exp's rounding."""
    return 2 * logit_atol + lse_rounding(n, max_abs_logit, u) + u * (2 * max_abs_logit + np.log(n) + 4)


def sinkhorn_log_atol(batch: int, protos: int, num_iters: int, epsilon: float, max_abs_score: float,
                      score_atol: float = 0.0, u: float = U32) -> float:
    """|computed - exact| of ``log q`` for every Sinkhorn-Knopp code ``q`` (to first order its relative error),
    on the log-domain or the scaling-vector path, for scores at most ``max_abs_score`` in magnitude and off by
    at most ``score_atol``. With ``L = max|s| / epsilon``: the logits err by ``score_atol / epsilon + u L``;
    each of the ``2 num_iters - 1`` normalisations is a log-sum-exp over ``batch`` or ``protos`` terms, 1-Lipschitz
    in the logits and in the previous potential (max norm), so the errors add up, each step adding its own
    rounding (``lse_rounding``, plus adding the potential and the constant ``log n``) for entries
    ``logit + potential`` that stay within ``4 L + log(B K)``; the final per-sample softmax counts its inputs'
    errors twice. The scaling-vector path rounds less per step (a kernel exponent within 4uL, one GEMV sum of
    positive terms, a reciprocal), so the same bound covers it."""
    big_l = max_abs_score / epsilon
    logit_atol = score_atol / epsilon + u * big_l
    size = 4 * big_l + np.log(batch * protos)
    if num_iters == 0:  # B * softmax over all B K entries
        return log_softmax_atol(batch * protos, logit_atol, big_l, u) + u
    err = 0.0
    for step in range(2 * num_iters - 1):
        n = batch if step % 2 == 0 else protos
        err += logit_atol + lse_rounding(n, size, u) + 2 * u * size
    return 2 * (logit_atol + err + u * size) + lse_rounding(protos, size, u) + u * (2 * size + 4)


def swap_loss_bounds(batch: int, protos: int, temperature: float, max_abs_score: float, loss: float,
                     codes_relative_error: float, score_atol: float = 0.0, u: float = U32) -> tuple[float, float]:
    """(loss atol, gradient atol) of one float32 evaluation of the swapped-prediction loss
    ``1/2 [CE(q_a, s_b) + CE(q_b, s_a)]``, ``CE(q, s) = mean_b -sum_k q_bk log softmax(s_b / T)_k``, against
    the exact value, for codes off by ``codes_relative_error`` (``expm1(sinkhorn_log_atol(...))`` for Sinkhorn
    codes, ``u`` for given float64 codes rounded to float32) and scores off by ``score_atol``.
    Loss: ``log p`` errs by ``log_softmax_atol`` (``L = max|s| / T``), weighted by codes summing to 1; the codes'
    error weights ``|log p|``, which the row itself sums, so it scales the loss; the ``protos``-term row sum and
    the ``batch``-term mean of non-negative terms add ``gamma`` of the loss. Gradient entry
    ``(p_k sum(q) - q_k) / (2 T B)`` with p, q <= 1: p's, q's and sum(q)'s relative errors plus three roundings."""
    big_l = max_abs_score / temperature
    p_err = log_softmax_atol(protos, score_atol / temperature + u * big_l, big_l, u)
    loss_atol = p_err + (codes_relative_error + gamma(protos, u) + gamma(batch, u) + 4 * u) * loss
    grad_atol = (p_err + 2 * codes_relative_error + gamma(protos, u) + 4 * u) / (2 * temperature * batch)
    return loss_atol, grad_atol


# A float32 result below the smallest normal number may be flushed to zero (XLA on CPU): an absolute floor.
FLUSHED = float(np.finfo(np.float32).tiny)


def sinkhorn_codes_rtol(scores, epsilon: float, num_iters: int, evaluations: int = 1, score_atol: float = 0.0,
                        u: float = U32) -> float:
    """Relative tolerance of float32 Sinkhorn codes of ``scores`` against exact ones (``evaluations=1``), or
    against another float32 evaluation in another summation order (2): ``sinkhorn_log_atol`` for the scores'
    shape and magnitude, once per evaluation. Pair it with ``atol=FLUSHED``."""
    batch, protos = np.shape(scores)
    log_atol = sinkhorn_log_atol(batch, protos, num_iters, epsilon, float(np.abs(scores).max()), score_atol, u)
    return float(np.expm1(evaluations * log_atol))


def codes_row_sum_atol(protos: int, u: float = U32) -> float:
    """|sum of a row of float32 codes - 1| (after at least one Sinkhorn round): the last normalisation divides
    the row by its own float32 sum (``gamma(protos)`` and two roundings per code), and a float32 sum of the
    row (NumPy's) adds ``gamma(protos)``."""
    return reorder_atol(protos, 1.0, u) + 4 * u


def probable_gamma(n: int, lam: float = 10.0, u: float = U32) -> float:
    """Higham and Mary's probabilistic counterpart of ``gamma(n)`` ("A new approach to probabilistic rounding
    error analysis", SIAM J. Sci. Comput. 41(5), 2019): with rounding errors independent and of mean zero, an
    ``n``-term sum or dot product is within ``lam sqrt(n) u`` (to first order) of the exact one, relative to its
    absolute terms, with probability at least ``1 - 2 n exp(-lam**2 / 2)`` (6e-19 for lam = 10, n = 1536). For
    long reductions in deep networks, where ``gamma(n)`` would hide real bugs; it takes ``gamma``'s place in
    ``network_atol``'s formula."""
    return lam * np.sqrt(n) * u


def clip_loss_bounds(batch: int, dim: int, logit_scale: float, loss: float, rounded_inputs: bool = True,
                     u: float = U32) -> tuple[float, float]:
    """(loss atol, gradient atol) of one float32 evaluation of the symmetric CLIP loss on rows of norm <= 1
    against the exact value. Logit ``s <x, y>``: the ``dim``-term dot product errs by ``gamma(dim)``
    (``|x||y| <= 1``), float64 inputs rounded to float32 (``rounded_inputs``) by 2u more, the product by s by u.
    Each of the 2B cross-entropy rows errs by ``log_softmax_atol``; their mean (non-negative terms) adds
    ``gamma(2B)`` of the loss. Gradient ``s / 2B sum_j (P_ij + P'_ij - 2 delta_ij) y_j``: weights adding up to
    at most ``2 s / B`` (``|y| <= 1``), off by the probabilities' relative error, and the sum's gamma."""
    logit_atol = logit_scale * (gamma(dim, u) + (3 if rounded_inputs else 1) * u)
    p_err = log_softmax_atol(batch, logit_atol, logit_scale, u)
    loss_atol = p_err + (gamma(2 * batch, u) + 2 * u) * loss
    return loss_atol, 2 * logit_scale / batch * (p_err + gamma(2 * batch, u) + 3 * u)


def siglip_loss_bounds(batch: int, dim: int, logit_scale: float, logit_bias: float, loss: float,
                       rounded_inputs: bool = True, u: float = U32) -> tuple[float, float]:
    """(loss atol, gradient atol) of one float32 evaluation of SigLIP on rows of norm <= 1 against the exact
    value. Logit ``s <x, y> + bias`` errs as CLIP's (``clip_loss_bounds``) plus ``u (s + |bias|)`` for the
    addition. Each of the B^2 terms ``softplus(-z l)`` errs by its logit's error (slope <= 1) plus 8u (exp,
    log1p) and its own rounding ``u |term|``; divided by B they add up to ``B (logit_atol + 8u)``, and the
    B^2-term sum adds ``gamma(B^2)`` of the loss. Gradient ``s / B sum_j z sigmoid(-z l_ij) y_j``: weights in
    [0, 1] off by ``logit_atol + 8u``, absolute terms adding up to at most s, and the B-term sum's gamma."""
    logit_atol = logit_scale * (gamma(dim, u) + (3 if rounded_inputs else 1) * u) + u * (logit_scale + abs(logit_bias))
    loss_atol = batch * (logit_atol + 8 * u) + (gamma(batch * batch, u) + 3 * u) * loss
    return loss_atol, logit_scale * (logit_atol + 8 * u + gamma(batch, u) + 2 * u)
