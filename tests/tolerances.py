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
    an absolute logit error into a relative one; a softmax's normaliser adds ``gamma(batch)``, and a few
    roundings (scale, exp, divide) add ``4 u``."""
    return gamma(dim, u) * logit_scale + gamma(batch, u) + 4.0 * u


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
