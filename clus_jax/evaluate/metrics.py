"""Evaluation metrics on embeddings: zero-shot classification (accuracy, predictions, confusion matrix,
per-class accuracy), retrieval recall, linear probe, k-NN, and a 2-D PCA projection for plots.

Pure functions on NumPy arrays (float32 or float64; JAX arrays are accepted and converted). Accuracies and
recalls are fractions in [0, 1].

Ties are broken deterministically by index: when several candidates (classes, captions, images, neighbours)
have exactly the same score, the one with the lower index ranks first, i.e. rankings are those of a stable
sort by descending score. Work is done in chunks of queries so memory stays ``O(chunk * candidates)``.

Nothing is scored silently wrong: labels outside ``[0, classes)`` (a -1 would wrap to the last class), ``k < 1``
and empty sets raise ValueError, and so do non-finite embeddings (a NaN or inf anywhere in a row), naming how
many rows. With ``nonfinite='wrong'`` such a row is scored as wrong instead, never as right: its scores are
NaN, and a NaN true score ranks behind every candidate (never in a top k, whatever k); it predicts no class
(-1), is no k-NN neighbour and no probe train example, and a probe answers it wrongly.
"""
from __future__ import annotations

import numbers
from collections.abc import Sequence

import numpy as np

_CHUNK = 1024
DEFAULT_L2_GRID = tuple(2.0 ** p for p in range(-10, 11, 2))
_BIAS_CONSTANT = 100.0  # constant feature standing in for a bias; large, so barely regularised
#: What to do with a non-finite embedding row: refuse it, or score it as wrong.
NONFINITE = ("raise", "wrong")


def l2_normalize(x, axis: int = -1, eps: float = 1e-12) -> np.ndarray:
    """``x / ||x||`` along ``axis``; all-zero vectors stay zero, and one with a NaN or inf gets a NaN."""
    x = np.asarray(x)
    if not np.issubdtype(x.dtype, np.floating):
        x = x.astype(np.float32)
    with np.errstate(invalid="ignore"):  # inf / inf: the NaN is meant
        return x / np.maximum(np.linalg.norm(x, axis=axis, keepdims=True), eps)


def check_nonfinite_mode(nonfinite: str) -> None:
    """ValueError unless ``nonfinite`` is one of ``NONFINITE``."""
    if nonfinite not in NONFINITE:
        raise ValueError(f"nonfinite must be one of {NONFINITE}, got {nonfinite!r}")


def check_finite(x, what: str, nonfinite: str = "raise", *, where: str = "") -> np.ndarray:
    """bool [n]: which rows of ``x`` [n, ...] are finite. With ``nonfinite='raise'`` a row with a NaN or inf is
    a ValueError naming ``what`` (after ``where``, e.g. the set) and how many rows are bad; with ``'wrong'`` the
    caller scores them as wrong."""
    check_nonfinite_mode(nonfinite)
    x = np.asarray(x)
    ok = np.isfinite(x).all(axis=tuple(range(1, x.ndim)))
    if nonfinite == "raise" and not ok.all():
        raise ValueError(f"{where}{int((~ok).sum())} of {len(ok)} {what} are not finite (NaN or inf)")
    return ok


def check_labels(labels, num_classes: int, what: str = "labels") -> np.ndarray:
    """``labels`` as int64 [n]; ValueError naming the first value outside ``[0, num_classes)``, which indexing
    would otherwise take silently (-1 is the last class)."""
    y = np.asarray(labels).astype(np.int64).reshape(-1)
    bad = (y < 0) | (y >= num_classes)
    if bad.any():
        raise ValueError(f"{what} must lie in [0, {num_classes}), got {y[bad][0]} "
                         f"({int(bad.sum())} of {len(y)} outside)")
    return y


def _check_k(k, what: str = "k") -> int:
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
        raise ValueError(f"{what} must be an integer >= 1, got {k!r}")
    return int(k)


def _nonempty(n: int, what: str) -> None:
    if n == 0:
        raise ValueError(f"no {what}: an empty set has no score")


def _blank(x: np.ndarray, ok: np.ndarray) -> np.ndarray:
    """``x`` with the rows not in ``ok`` all NaN, so every score of theirs is NaN (no copy when all are ok)."""
    return x if ok.all() else np.where(ok[:, None], x, np.nan)


def _checked(queries: np.ndarray, candidates: np.ndarray, what: tuple[str, str],
             nonfinite: str) -> tuple[np.ndarray, np.ndarray]:
    """Both embedding sets, their non-finite rows refused (``'raise'``) or made all NaN (``'wrong'``)."""
    return (_blank(queries, check_finite(queries, what[0], nonfinite)),
            _blank(candidates, check_finite(candidates, what[1], nonfinite)))


def _ranks_of(scores: np.ndarray, target: np.ndarray) -> np.ndarray:
    """0-based rank of column ``target[i]`` in row ``i`` under a stable descending sort of ``scores[i]``.

    A NaN candidate never ranks ahead (NaN sorts behind every number); a NaN true score ranks behind every
    candidate: rank = number of columns, outside every top k (see ``_hit_rate``)."""
    true = np.take_along_axis(scores, target[:, None], axis=1)
    cols = np.arange(scores.shape[1])[None, :]
    ahead = (scores > true) | ((scores == true) & (cols < target[:, None]))
    return np.where(np.isnan(true[:, 0]), scores.shape[1], ahead.sum(axis=1))


def _hit_rate(ranks: np.ndarray, k: int, num_candidates: int) -> float:
    """Fraction of ranks in the top k; a k beyond the candidates counts as all of them, so every finite row
    is a hit there and a NaN one (rank = ``num_candidates``) still a miss."""
    return float(np.mean(ranks < min(k, num_candidates)))


def _best(scores: np.ndarray) -> np.ndarray:
    """Column of the highest score per row (ties: lower index, as in the ranks; NaN never wins); -1 for a row
    without a number."""
    finite = ~np.isnan(scores)
    if finite.all():
        return np.argmax(scores, axis=1)
    return np.where(finite.any(axis=1), np.argmax(np.where(finite, scores, -np.inf), axis=1), -1)


def zeroshot_classifier(class_text_embs) -> np.ndarray:
    """Zero-shot head ``[C, D]`` from per-template text embeddings ``[C, T, D]``.

    CLIP style: each template embedding is normalised, averaged over templates, and the mean normalised again.
    """
    e = np.asarray(class_text_embs)
    if e.ndim != 3:
        raise ValueError(f"class_text_embs must be [classes, templates, dim], got shape {e.shape}")
    return l2_normalize(l2_normalize(e).mean(axis=1))


def zeroshot_accuracy(image_embs, labels, classifier, ks: Sequence[int] = (1, 5), *,
                      nonfinite: str = "raise") -> dict[str, float]:
    """Top-k accuracy of ``argmax(image @ classifier.T)``: ``{'top1': ..., 'top5': ...}``.

    k larger than the number of classes counts every finite prediction as correct. ``nonfinite``: see the
    module docstring (an image or class row with a NaN or inf).
    """
    ks = [_check_k(k, "ks") for k in ks]
    ranks = zeroshot_ranks(image_embs, labels, classifier, nonfinite=nonfinite)
    _nonempty(len(ranks), "image embeddings")
    return {f"top{k}": _hit_rate(ranks, k, np.shape(classifier)[0]) for k in ks}


def zeroshot_ranks(image_embs, labels, classifier, *, nonfinite: str = "raise") -> np.ndarray:
    """0-based rank of each image's true class among ``image @ classifier.T`` (ties: lower class first); an
    image with a NaN or inf (``nonfinite='wrong'``) ranks behind every class (rank = number of classes).
    The top-k hits of a streamed evaluation are sums of ``ranks < k`` over its batches."""
    x = l2_normalize(image_embs)
    w = np.asarray(classifier)
    y = np.asarray(labels).reshape(-1)
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"{x.shape[0]} image embeddings but {y.shape[0]} labels")
    y = check_labels(y, w.shape[0])
    x, w = _checked(x, w, ("image embeddings", "classifier rows"), nonfinite)
    ranks = [_ranks_of(x[i:i + _CHUNK] @ w.T, y[i:i + _CHUNK]) for i in range(0, len(y), _CHUNK)]
    return np.concatenate(ranks) if ranks else np.zeros(0, np.int64)


def zeroshot_predictions(image_embs, classifier, *, nonfinite: str = "raise") -> np.ndarray:
    """Predicted class ``argmax(image @ classifier.T)`` per image (ties: lower class index, as in the ranks).

    With ``nonfinite='wrong'`` an image with a NaN or inf predicts -1 (no class) and a class row with one is
    never predicted, so the predictions agree with ``zeroshot_accuracy``'s top-1.
    """
    x = l2_normalize(image_embs)
    x, w = _checked(x, np.asarray(classifier), ("image embeddings", "classifier rows"), nonfinite)
    preds = [_best(x[i:i + _CHUNK] @ w.T) for i in range(0, x.shape[0], _CHUNK)]
    return np.concatenate(preds).astype(np.int64) if preds else np.zeros(0, np.int64)


def confusion_matrix(labels, predictions, num_classes: int) -> np.ndarray:
    """int64 ``[C, C]`` counts: row = true class, column = predicted class."""
    y = np.asarray(labels).astype(np.int64).reshape(-1)
    p = np.asarray(predictions).astype(np.int64).reshape(-1)
    if y.shape != p.shape:
        raise ValueError(f"{len(y)} labels but {len(p)} predictions")
    y, p = check_labels(y, num_classes, "labels"), check_labels(p, num_classes, "predictions")
    return np.bincount(y * num_classes + p, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def per_class_accuracy(confusion: np.ndarray, totals=None) -> np.ndarray:
    """Recall of each true class (diagonal / examples of the class); NaN for a class with no examples.

    ``totals``: examples per class, when some are not in ``confusion`` (no prediction: a non-finite
    embedding), which then count as wrong; default the row sums.
    """
    c = np.asarray(confusion, np.float64)
    rows = c.sum(axis=1) if totals is None else np.asarray(totals, np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(rows > 0, np.diag(c) / np.where(rows > 0, rows, 1.0), np.nan)


def pca_2d(x) -> tuple[np.ndarray, np.ndarray]:
    """Projection of the rows of ``x`` onto their first two principal axes, and the variance ratio each explains.

    Centred, computed in float64 by SVD; the sign of each axis is fixed so its largest-magnitude loading is
    positive (the picture does not flip between evaluations). Fewer than two dimensions are padded with zeros.
    Rows with a NaN or inf take no part in the axes and get NaN points (not drawn).
    """
    x = np.asarray(x, np.float64)
    ok = np.isfinite(x).all(axis=1)
    if not ok.all():
        points, ratio = pca_2d(x[ok])
        out = np.full((len(x), 2), np.nan)
        out[ok] = points
        return out, ratio
    centred = x - x.mean(axis=0, keepdims=True) if len(x) else x
    _, s, vt = np.linalg.svd(centred, full_matrices=False)
    axes = vt[:2]
    axes = axes * np.sign(axes[np.arange(len(axes)), np.argmax(np.abs(axes), axis=1)])[:, None]
    points = centred @ axes.T
    total = float(np.sum(s ** 2))
    ratio = (s[:2] ** 2) / total if total > 0 else np.zeros(len(s[:2]))
    pad = 2 - points.shape[1]
    return np.pad(points, ((0, 0), (0, pad))), np.pad(ratio, (0, pad))


def retrieval_recall(image_embs, text_embs, caption_to_image, ks: Sequence[int] = (1, 5, 10), *,
                     nonfinite: str = "raise") -> dict[str, float]:
    """Recall@k for image->text and text->image retrieval by cosine similarity.

    ``caption_to_image[m]`` is the image of caption ``m``. An image query is correct at k when any of its
    captions ranks in the top k; images without captions are left out of image->text. A caption query is
    correct at k when its image ranks in the top k. Keys: ``i2t_r{k}`` and ``t2i_r{k}``. ``nonfinite``: see
    the module docstring; an image whose captions all have a NaN or inf (or which has one itself) is a miss.
    """
    img = l2_normalize(image_embs)
    txt = l2_normalize(text_embs)
    ks = [_check_k(k, "ks") for k in ks]
    c2i = np.asarray(caption_to_image).astype(np.int64).reshape(-1)
    n, m = img.shape[0], txt.shape[0]
    if c2i.shape[0] != m:
        raise ValueError(f"{m} text embeddings but caption_to_image has {c2i.shape[0]} entries")
    if m and (c2i.min() < 0 or c2i.max() >= n):
        raise ValueError(f"caption_to_image must index {n} images, got range [{c2i.min()}, {c2i.max()}]")
    _nonempty(m, "captions")
    img, txt = _checked(img, txt, ("image embeddings", "text embeddings"), nonfinite)

    t2i_ranks = np.concatenate([_ranks_of(txt[i:i + _CHUNK] @ img.T, c2i[i:i + _CHUNK]) for i in range(0, m, _CHUNK)])

    # For each image, its best caption: highest score, lowest index among equals (its best possible rank);
    # an image none of whose captions has a number ranks behind every caption.
    has_caption = np.bincount(c2i, minlength=n) > 0
    i2t_ranks = []
    for i in range(0, n, _CHUNK):
        s = img[i:i + _CHUNK] @ txt.T
        own = c2i[None, :] == np.arange(i, i + s.shape[0])[:, None]
        best = _best(np.where(own, s, np.nan))
        i2t_ranks.append(np.where(best >= 0, _ranks_of(s, np.maximum(best, 0)), m))
    i2t_ranks = np.concatenate(i2t_ranks)[has_caption]

    out = {}
    for name, ranks, candidates in (("i2t", i2t_ranks, m), ("t2i", t2i_ranks, n)):
        for k in ks:
            out[f"{name}_r{k}"] = _hit_rate(ranks, k, candidates)
    return out


def _whiten_with_bias(train_x: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
    """Standardises features with train statistics and appends a constant bias feature."""
    mean = train_x.mean(axis=0, keepdims=True)
    std = train_x.std(axis=0, keepdims=True) + 1e-5
    return [np.pad((x - mean) / std, ((0, 0), (0, 1)), constant_values=_BIAS_CONSTANT)
            for x in (train_x, *others)]


class _RidgeSolver:
    """Ridge regression onto {-1, +1} one-hot targets for many l2 values from one eigendecomposition."""

    def __init__(self, x: np.ndarray, y: np.ndarray, num_classes: int):
        t = 2.0 * np.eye(num_classes)[y] - 1.0
        if x.shape[0] >= x.shape[1]:  # (x^T x + l2 I)^-1 x^T t
            eigs, q = np.linalg.eigh(x.T @ x)
            self.lhs, self.rhs = q, q.T @ (x.T @ t)
        else:  # x^T (x x^T + l2 I)^-1 t
            eigs, q = np.linalg.eigh(x @ x.T)
            self.lhs, self.rhs = x.T @ q, q.T @ t
        self.eigs = np.maximum(eigs, 0.0)

    def weights(self, l2_reg: float) -> np.ndarray:
        return (self.lhs / (self.eigs + l2_reg)[None, :]) @ self.rhs


def _probe_split(train_x, train_y, test_x, test_y, num_classes: int, dtype,
                 nonfinite: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A probe's inputs, checked: ``(train_x, train_y, test_x, test_y, test_ok)`` with only the finite train
    rows, and the non-finite test rows zeroed and marked in ``test_ok`` (they count as wrong)."""
    xtr, xte = np.asarray(train_x, dtype), np.asarray(test_x, dtype)
    ytr = check_labels(train_y, num_classes, "train labels")
    yte = check_labels(test_y, num_classes, "test labels")
    for what, x, y in (("train", xtr, ytr), ("test", xte, yte)):
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"{x.shape[0]} {what} embeddings but {y.shape[0]} {what} labels")
        _nonempty(len(y), f"{what} examples")
    keep = check_finite(xtr, "train embeddings", nonfinite)
    test_ok = check_finite(xte, "test embeddings", nonfinite)
    if not keep.all():
        xtr, ytr = xtr[keep], ytr[keep]
    if not test_ok.all():
        xte = np.where(test_ok[:, None], xte, 0)
    return xtr, ytr, xte, yte, test_ok


def linear_probe_accuracy(train_x, train_y, test_x, test_y, num_classes: int,
                          l2_reg: float | Sequence[float] | None = None, *,
                          val_fraction: float = 0.2, seed: int = 0, nonfinite: str = "raise") -> float:
    """Top-1 accuracy of a closed-form L2-regularised least-squares probe (big_vision ``fewshot_lsr`` style).

    Features are standardised with train statistics and get a constant bias feature; targets are one-hot in
    {-1, +1}. ``l2_reg`` may be one value, or a grid (``None`` = ``DEFAULT_L2_GRID``) from which the value
    with the best accuracy on a held-out ``val_fraction`` of the train split (fixed ``seed``; the smallest
    value wins ties) is picked before refitting on the whole train split. Computed in float64. ``nonfinite``:
    see the module docstring; with no finite train row every answer is wrong (0.0).
    """
    xtr, ytr, xte, yte, test_ok = _probe_split(train_x, train_y, test_x, test_y, num_classes, np.float64,
                                               nonfinite)
    if len(ytr) == 0:
        return 0.0
    grid = DEFAULT_L2_GRID if l2_reg is None else (
        (float(l2_reg),) if np.isscalar(l2_reg) else tuple(sorted(float(v) for v in l2_reg)))
    if len(grid) > 1:
        order = np.random.default_rng(seed).permutation(len(ytr))
        n_val = int(round(val_fraction * len(ytr)))
        if 0 < n_val < len(ytr):
            fit, val = order[n_val:], order[:n_val]
            xf, xv = _whiten_with_bias(xtr[fit], xtr[val])
            solver = _RidgeSolver(xf, ytr[fit], num_classes)
            accs = [np.mean(np.argmax(xv @ solver.weights(l2), axis=1) == ytr[val]) for l2 in grid]
            grid = (grid[int(np.argmax(accs))],)
        else:
            grid = (grid[len(grid) // 2],)
    xf, xt = _whiten_with_bias(xtr, xte)
    w = _RidgeSolver(xf, ytr, num_classes).weights(grid[0])
    return float(np.mean((np.argmax(xt @ w, axis=1) == yte) & test_ok))


def logistic_probe_accuracy(train_x, train_y, test_x, test_y, num_classes: int, l2_reg: float = 1e-4, *,
                            steps: int = 500, nonfinite: str = "raise") -> float:
    """Top-1 accuracy of a multinomial logistic-regression probe trained full-batch in JAX.

    Standardised features plus bias; minimises mean cross-entropy + ``l2_reg/2 * ||W||^2`` (bias unregularised)
    by Nesterov-accelerated gradient descent with step ``1/L`` from the smoothness bound, so it is
    deterministic and needs no learning-rate tuning. ``nonfinite``: as for ``linear_probe_accuracy``.
    """
    import jax
    import jax.numpy as jnp

    xtr, ytr, xte, yte, test_ok = _probe_split(train_x, train_y, test_x, test_y, num_classes, np.float32,
                                               nonfinite)
    if len(ytr) == 0:
        return 0.0
    ytr = ytr.astype(np.int32)
    mean, std = xtr.mean(0, keepdims=True), xtr.std(0, keepdims=True) + 1e-5
    xtr, xte = (xtr - mean) / std, (xte - mean) / std
    top_eig = float(np.linalg.eigvalsh(xtr.T.astype(np.float64) @ xtr).max())
    lipschitz = 0.5 * top_eig / len(ytr) + 0.5 + l2_reg  # 0.5 for the bias column
    lr = 1.0 / lipschitz

    def loss(p, x, y):
        logits = x @ p["w"] + p["b"]
        ce = jnp.mean(jax.nn.logsumexp(logits, axis=1) - jnp.take_along_axis(logits, y[:, None], 1)[:, 0])
        return ce + 0.5 * l2_reg * jnp.sum(p["w"] ** 2)

    @jax.jit
    def fit(x, y):
        grad = jax.grad(loss)
        p0 = {"w": jnp.zeros((x.shape[1], num_classes)), "b": jnp.zeros((num_classes,))}

        def body(t, carry):
            p, prev = carry
            mom = (t - 1.0) / (t + 2.0)
            look = jax.tree.map(lambda a, b: a + mom * (a - b), p, prev)
            new = jax.tree.map(lambda a, g: a - lr * g, look, grad(look, x, y))
            return new, p

        return jax.lax.fori_loop(0, steps, body, (p0, p0))[0]

    p = fit(jnp.asarray(xtr), jnp.asarray(ytr))
    pred = np.argmax(np.asarray(xte @ np.asarray(p["w"]) + np.asarray(p["b"])), axis=1)
    return float(np.mean((pred == yte) & test_ok))


def knn_accuracy(train_x, train_y, test_x, test_y, k: int = 20, temperature: float = 0.07,
                 num_classes: int | None = None, *, nonfinite: str = "raise") -> float:
    """Top-1 accuracy of a weighted k-NN classifier on cosine similarity (DINO style).

    Each of the k most similar train points (ties: lower train index first; k >= 1, capped at the train size)
    votes for its label with weight ``exp(sim / temperature)``; the class with the largest total wins (ties:
    lower class index). ``num_classes`` defaults to the largest label + 1. ``nonfinite``: see the module
    docstring.
    """
    k = _check_k(k)
    if num_classes is None:
        every = np.concatenate([np.asarray(train_y).reshape(-1), np.asarray(test_y).reshape(-1)]).astype(np.int64)
        num_classes = int(every.max(initial=0)) + 1
    c = int(num_classes)
    xtr, ytr, xte, yte, test_ok = _probe_split(train_x, train_y, test_x, test_y, c, None, nonfinite)
    if len(ytr) == 0:
        return 0.0
    tr = l2_normalize(xtr)
    te = l2_normalize(xte)
    k = min(k, len(ytr))
    correct = 0
    for i in range(0, len(yte), _CHUNK):
        s = te[i:i + _CHUNK] @ tr.T
        nn = np.argsort(-s, axis=1, kind="stable")[:, :k]
        sims = np.take_along_axis(s, nn, axis=1).astype(np.float64)
        weights = np.exp((sims - 1.0) / temperature)  # shifted by the max possible cosine: same argmax, no overflow
        votes = np.zeros((s.shape[0], c))
        np.add.at(votes, (np.arange(s.shape[0])[:, None], ytr[nn]), weights)
        correct += int(np.sum((np.argmax(votes, axis=1) == yte[i:i + _CHUNK]) & test_ok[i:i + _CHUNK]))
    return correct / len(yte)
