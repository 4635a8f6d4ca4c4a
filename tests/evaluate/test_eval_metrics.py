"""Metrics on hand-built embeddings whose answers are known analytically."""
import numpy as np
import pytest

from clus_jax.evaluate import metrics as M


def embed_scores(scores: np.ndarray):
    """Image and text embeddings whose cosine similarity matrix is ``scores / R`` for one constant R.

    Images are one-hot; each text carries its column of ``scores`` plus one padding coordinate that gives all
    texts the same norm R, so scores stay comparable across texts (needed for image->text ranking).
    """
    n, m = scores.shape
    norms = np.linalg.norm(scores, axis=0)
    r = norms.max() + 1.0
    img = np.concatenate([np.eye(n), np.zeros((n, 1))], axis=1)
    txt = np.concatenate([scores.T, np.sqrt(r ** 2 - norms ** 2)[:, None]], axis=1)
    return img, txt


# ----------------------------------------------------------------------------------------------- zero-shot


def test_zeroshot_classifier_normalises_each_template_then_the_mean():
    embs = np.array([[[3.0, 0.0], [0.0, 1.0]],      # class 0: two templates of very different norms
                     [[0.0, -2.0], [0.0, -5.0]]])   # class 1
    w = M.zeroshot_classifier(embs)
    assert w.dtype == np.float64  # float64: 1e-7 is ~1e8 times the few roundings of two normalisations
    np.testing.assert_allclose(w, [[np.sqrt(0.5), np.sqrt(0.5)], [0.0, -1.0]], atol=1e-7)
    with pytest.raises(ValueError, match="templates"):
        M.zeroshot_classifier(embs[0])


def test_zeroshot_identity_and_permutation():
    eye = np.eye(10, dtype=np.float32)
    assert M.zeroshot_accuracy(eye, np.arange(10), eye) == {"top1": 1.0, "top5": 1.0}
    acc = M.zeroshot_accuracy(eye[[0, 1, 3, 2]][:, :4], np.arange(4), eye[:4, :4], ks=(1, 2, 5))
    assert acc == {"top1": 0.5, "top2": 0.5, "top5": 1.0}  # swapped ones rank 1 (tie at 0, lower index first)


def test_zeroshot_rank_exactly_k():
    classifier = np.eye(6)
    image = np.array([[0.9, 0.8, 0.7, 0.6, 0.5, 0.1]] * 3)  # class j has rank j
    acc = M.zeroshot_accuracy(image, np.array([4, 0, 5]), classifier, ks=(1, 4, 5, 6))
    assert acc == {"top1": 1 / 3, "top4": 1 / 3, "top5": 2 / 3, "top6": 1.0}


def test_zeroshot_ties_break_by_class_index():
    images = np.zeros((2, 3))  # every class scores 0: rank = class index
    acc = M.zeroshot_accuracy(images, np.array([0, 2]), np.eye(3), ks=(1, 2, 3))
    assert acc == {"top1": 0.5, "top2": 0.5, "top3": 1.0}


# ----------------------------------------------------------------------------------------------- retrieval


def test_retrieval_identity():
    eye = np.eye(12, dtype=np.float32)
    out = M.retrieval_recall(eye, eye, np.arange(12))
    assert out == {f"{d}_r{k}": 1.0 for d in ("i2t", "t2i") for k in (1, 5, 10)}


def test_text_to_image_rank_boundaries():
    rng = np.random.default_rng(0)
    ranks = np.array([0, 1, 4, 5, 9, 10, 0, 3, 11, 2, 6, 7])
    n = len(ranks)
    scores = np.zeros((n, n))
    for m, r in enumerate(ranks):  # caption m belongs to image m, which is placed at rank r
        order = [j for j in rng.permutation(n) if j != m]
        order.insert(r, m)
        scores[order, m] = np.linspace(1.0, 0.1, n)
    img, txt = embed_scores(scores)
    out = M.retrieval_recall(img, txt, np.arange(n), ks=(1, 4, 5, 10, 11))
    for k in (1, 4, 5, 10, 11):
        assert out[f"t2i_r{k}"] == pytest.approx(np.mean(ranks < k)), k


def test_image_to_text_any_caption_counts_and_captionless_images_are_skipped():
    scores = np.array([
        [0.1, 0.5, 0.9, 0.8, 0.7],   # image 0 owns captions 0, 1: best (0.5) has rank 3
        [0.9, 0.1, 0.2, 0.3, 0.05],  # image 1 owns captions 2, 3, 4: best (0.3) has rank 1
        [0.0, 0.6, 0.0, 0.0, 0.9],   # image 2 owns no caption
    ])
    img, txt = embed_scores(scores)
    out = M.retrieval_recall(img, txt, np.array([0, 0, 1, 1, 1]), ks=(1, 2, 3, 4))
    assert [out[f"i2t_r{k}"] for k in (1, 2, 3, 4)] == [0.0, 0.5, 0.5, 1.0]
    # text->image: true-image ranks per caption are 1, 1, 1, 1, 2
    assert [out[f"t2i_r{k}"] for k in (1, 2, 3, 4)] == [0.0, 0.8, 1.0, 1.0]


def test_retrieval_ties_break_by_index():
    same = np.ones((4, 3))
    c2i = np.array([0, 1, 2, 3, 0, 1, 2, 3])
    out = M.retrieval_recall(same, np.ones((8, 3)), c2i, ks=(1, 2, 5))
    # t2i rank = index of the true image; i2t rank = index of the image's first caption (0..3)
    assert out == {"i2t_r1": 0.25, "i2t_r2": 0.5, "i2t_r5": 1.0, "t2i_r1": 0.25, "t2i_r2": 0.5, "t2i_r5": 1.0}


def test_retrieval_chunking_matches(monkeypatch):
    rng = np.random.default_rng(1)
    img, txt = rng.normal(size=(37, 8)), rng.normal(size=(70, 8))
    c2i = rng.integers(0, 37, size=70)
    full = M.retrieval_recall(img, txt, c2i)
    monkeypatch.setattr(M, "_CHUNK", 5)
    assert M.retrieval_recall(img, txt, c2i) == full


def test_retrieval_rejects_bad_mapping():
    with pytest.raises(ValueError, match="index"):
        M.retrieval_recall(np.eye(2), np.eye(2), np.array([0, 2]))
    with pytest.raises(ValueError, match="entries"):
        M.retrieval_recall(np.eye(2), np.eye(2), np.array([0]))


# ------------------------------------------------------------------------------------------------- probes


def _clusters(rng, n_per, centers, noise):
    x = np.concatenate([c + noise * rng.normal(size=(n_per, centers.shape[1])) for c in centers])
    y = np.repeat(np.arange(len(centers)), n_per)
    return x.astype(np.float32), y


def test_linear_probe_separable_clusters():
    rng = np.random.default_rng(0)
    centers = 3.0 * rng.normal(size=(4, 16))
    trx, try_ = _clusters(rng, 50, centers, 0.5)
    tex, tey = _clusters(rng, 25, centers, 0.5)
    assert M.linear_probe_accuracy(trx, try_, tex, tey, 4) == 1.0
    assert M.linear_probe_accuracy(trx, try_, tex, tey, 4, l2_reg=1e-3) == 1.0


def test_linear_probe_random_labels_is_near_chance():
    rng = np.random.default_rng(0)
    trx, tex = rng.normal(size=(1000, 8)), rng.normal(size=(2000, 8))
    acc = M.linear_probe_accuracy(trx, rng.integers(0, 5, 1000), tex, rng.integers(0, 5, 2000), 5)
    assert abs(acc - 0.2) < 0.04


@pytest.mark.parametrize("n", [40, 6])  # n >= dim uses x^T x, n < dim uses x x^T
def test_ridge_solver_matches_direct_solve(n):
    rng = np.random.default_rng(n)
    x, y = rng.normal(size=(n, 10)), rng.integers(0, 3, n)
    t = 2.0 * np.eye(3)[y] - 1.0
    direct = np.linalg.solve(x.T @ x + 0.5 * np.eye(10), x.T @ t)
    # float64: condition number below 1e3 here, so two solves differ by about 1e3 * 1e-16 of |w| ~ 1.
    np.testing.assert_allclose(M._RidgeSolver(x, y, 3).weights(0.5), direct, atol=1e-8)


def test_logistic_probe_separable_clusters():
    rng = np.random.default_rng(0)
    centers = 3.0 * rng.normal(size=(3, 8))
    trx, try_ = _clusters(rng, 30, centers, 0.5)
    tex, tey = _clusters(rng, 20, centers, 0.5)
    assert M.logistic_probe_accuracy(trx, try_, tex, tey, 3, steps=200) == 1.0


def test_knn_hand_example():
    train = np.array([[1.0, 0.0], [0.8, 0.6], [0.6, 0.8], [0.0, 1.0]])
    labels = np.array([0, 1, 1, 0])
    query = np.array([[0.96, 0.28]])  # cosines .96 (label 0), .936 (1), .8 (1), .28 (0)
    assert M.knn_accuracy(train, labels, query, [0], k=1) == 1.0
    # sharp weights: e^(.96/.07) > e^(.936/.07) + e^(.8/.07), so the single nearest label-0 point wins
    assert M.knn_accuracy(train, labels, query, [0], k=3, temperature=0.07) == 1.0
    # flat weights: two label-1 votes beat one label-0 vote
    assert M.knn_accuracy(train, labels, query, [1], k=3, temperature=10.0) == 1.0


def test_knn_ties():
    train = np.array([[1.0, 0.0], [1.0, 0.0]])
    # equal neighbours: k=1 takes the lower train index (label 1); k=2 splits the vote, lower class (0) wins
    assert M.knn_accuracy(train, [1, 0], [[1.0, 0.0]], [1], k=1) == 1.0
    assert M.knn_accuracy(train, [1, 0], [[1.0, 0.0]], [0], k=2) == 1.0
    assert M.knn_accuracy(train, [1, 0], [[1.0, 0.0]], [0], k=50) == 1.0  # k capped at the train size


def test_knn_separable_clusters():
    rng = np.random.default_rng(0)
    centers = 3.0 * rng.normal(size=(5, 16))
    trx, try_ = _clusters(rng, 20, centers, 0.3)
    tex, tey = _clusters(rng, 10, centers, 0.3)
    assert M.knn_accuracy(trx, try_, tex, tey, k=20) == 1.0


# ------------------------------------------------------------------------- confusion matrix and PCA


def test_zeroshot_predictions_break_ties_to_the_lower_class_like_the_ranks():
    classifier = np.eye(3)
    images = np.array([[0.0, 1.0, 1.0], [1.0, 0.0, 0.0], [0.2, 0.1, 0.9]])  # image 0 ties classes 1 and 2
    np.testing.assert_array_equal(M.zeroshot_predictions(images, classifier), [1, 0, 2])
    top1 = M.zeroshot_accuracy(images, [1, 0, 2], classifier, ks=(1,))["top1"]
    assert top1 == 1.0


def test_confusion_matrix_and_per_class_accuracy_by_hand():
    labels = [0, 0, 0, 1, 1, 3]
    preds = [0, 2, 0, 1, 0, 3]
    conf = M.confusion_matrix(labels, preds, 4)
    np.testing.assert_array_equal(conf, [[2, 0, 1, 0], [1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 1]])
    acc = M.per_class_accuracy(conf)
    np.testing.assert_allclose(acc[[0, 1, 3]], [2 / 3, 1 / 2, 1.0])  # float64 ratios of counts: one rounding
    assert np.isnan(acc[2])  # no example of class 2
    with pytest.raises(ValueError, match="predictions must lie"):
        M.confusion_matrix([0], [4], 4)
    with pytest.raises(ValueError, match="1 labels but 2"):
        M.confusion_matrix([0], [0, 1], 4)


def test_pca_2d_against_the_covariance_eigenvectors():
    rng = np.random.default_rng(0)
    # Variance 9 along (1, 1, 0)/sqrt2, 1 along z, 0.01 along (1, -1, 0)/sqrt2, shifted off the origin.
    u = np.array([[1.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, -1.0, 0.0]])
    u[[0, 2]] /= np.sqrt(2.0)
    x = (rng.normal(size=(500, 3)) * [3.0, 1.0, 0.1]) @ u + 5.0
    points, ratio = M.pca_2d(x)
    cov = np.cov(x.T, bias=True)
    eigs, vecs = np.linalg.eigh(cov)  # ascending
    top = vecs[:, ::-1][:, :2]
    centred = x - x.mean(0)
    # float64 throughout (SVD against eigh): eigen-gaps of 1 and more keep the axes to ~1e-14 of |x| ~ 10.
    np.testing.assert_allclose(np.abs(points), np.abs(centred @ top), atol=1e-9)
    np.testing.assert_allclose(ratio, eigs[::-1][:2] / eigs.sum(), rtol=1e-9)
    assert ratio[0] == pytest.approx(9 / 10.01, abs=0.05)
    # Signs are fixed: the largest-magnitude loading of each axis is positive, whatever the input sign.
    flipped, _ = M.pca_2d(-x)
    np.testing.assert_allclose(flipped, -points, atol=1e-9)
    axis_0 = np.linalg.lstsq(centred, points[:, 0], rcond=None)[0]
    assert axis_0[np.argmax(np.abs(axis_0))] > 0
    one_dim, ratio_1 = M.pca_2d(x[:, :1])
    assert one_dim.shape == (500, 2) and np.all(one_dim[:, 1] == 0) and ratio_1[1] == 0


# ------------------------------------------------- non-finite embeddings, labels out of range, k, empty sets


def test_ranks_of_puts_a_nan_true_score_behind_every_candidate():
    scores = np.array([[np.nan, np.nan, np.nan],   # all NaN: the true class is last, past every top k
                       [0.5, np.nan, 0.2],         # a NaN candidate never ranks ahead of the true one
                       [0.1, 0.3, 0.3]])         # a tie: the lower index first
    np.testing.assert_array_equal(M._ranks_of(scores, np.array([0, 2, 2])), [3, 1, 1])


def test_ranks_of_matches_a_stable_argsort_with_nan_last():
    rng = np.random.default_rng(0)
    scores = np.round(rng.normal(size=(200, 9)))  # many ties
    scores[rng.random(scores.shape) < 0.2] = np.nan
    scores[:10] = np.nan
    target = rng.integers(0, 9, 200)
    order = np.argsort(-scores, axis=1, kind="stable")  # NumPy sorts NaN last
    position = np.argmax(order == target[:, None], axis=1)
    expected = np.where(np.isnan(scores[np.arange(200), target]), 9, position)
    np.testing.assert_array_equal(M._ranks_of(scores, target), expected)


def test_nan_images_are_refused_or_scored_wrong_never_right():
    labels, classifier = np.arange(100) % 8, np.eye(8)
    with pytest.raises(ValueError, match=r"^100 of 100 image embeddings are not finite \(NaN or inf\)$"):
        M.zeroshot_accuracy(np.full((100, 8), np.nan), labels, classifier)
    nan = M.zeroshot_accuracy(np.full((100, 8), np.nan), labels, classifier, ks=(1, 5, 8, 20), nonfinite="wrong")
    assert nan == {"top1": 0.0, "top5": 0.0, "top8": 0.0, "top20": 0.0}
    # Every finite image is right; rows with a NaN or an inf are wrong at every k.
    images = np.eye(8)[labels]
    images[[3, 50, 99], 2] = [np.nan, np.inf, -np.inf]
    with pytest.raises(ValueError, match="^3 of 100 image embeddings"):
        M.zeroshot_accuracy(images, labels, classifier)
    acc = M.zeroshot_accuracy(images, labels, classifier, ks=(1, 20), nonfinite="wrong")
    assert acc == {"top1": 0.97, "top20": 0.97}
    predictions = M.zeroshot_predictions(images, classifier, nonfinite="wrong")
    np.testing.assert_array_equal(predictions, np.where(np.isin(np.arange(100), [3, 50, 99]), -1, labels))
    with pytest.raises(ValueError, match="nonfinite must be one of"):
        M.zeroshot_accuracy(images, labels, classifier, nonfinite="ignore")


def test_a_nan_class_is_never_predicted_and_its_images_are_wrong():
    rng = np.random.default_rng(1)
    images, labels = rng.normal(size=(300, 6)), rng.integers(0, 6, 300)
    classifier = M.l2_normalize(rng.normal(size=(6, 6)))
    classifier[4] = np.nan  # e.g. the text tower gave NaN for one class name
    with pytest.raises(ValueError, match="^1 of 6 classifier rows are not finite"):
        M.zeroshot_predictions(images, classifier)
    acc = M.zeroshot_accuracy(images, labels, classifier, ks=(1, 2), nonfinite="wrong")
    predictions = M.zeroshot_predictions(images, classifier, nonfinite="wrong")
    # Independent: the other classes' scores, ranked by NumPy's stable sort; class 4 never scores.
    scores = M.l2_normalize(images) @ np.delete(classifier, 4, axis=0).T
    top2 = np.delete(np.arange(6), 4)[np.argsort(-scores, axis=1, kind="stable")[:, :2]]
    assert 4 not in predictions and np.all(predictions == top2[:, 0])
    assert acc["top1"] == np.mean(predictions == labels) == np.mean(top2[:, 0] == labels)
    assert acc["top2"] == np.mean(np.any(top2 == labels[:, None], axis=1))


def test_retrieval_scores_nan_images_and_captions_as_misses():
    c2i = np.array([0, 0, 1, 2, 3])
    images, texts = np.eye(4), np.eye(4)[c2i]  # every query right at rank 0 while finite
    images[1] = np.nan
    texts[[1, 3]] = np.nan
    with pytest.raises(ValueError, match="^1 of 4 image embeddings"):
        M.retrieval_recall(images, texts, c2i)
    with pytest.raises(ValueError, match="^2 of 5 text embeddings"):
        M.retrieval_recall(np.eye(4), texts, c2i)
    out = M.retrieval_recall(images, texts, c2i, ks=(1, 10), nonfinite="wrong")
    # i2t: image 0 keeps its finite caption 0; image 1 is NaN; image 2's only caption (3) is NaN; image 3 is fine.
    # t2i: captions 0 and 4 are fine; 1 and 3 are NaN, 2 belongs to the NaN image 1.
    assert out == {"i2t_r1": 0.5, "i2t_r10": 0.5, "t2i_r1": 0.4, "t2i_r10": 0.4}
    everything_nan = M.retrieval_recall(np.full((4, 4), np.nan), texts, c2i, nonfinite="wrong")
    assert set(everything_nan.values()) == {0.0}


def test_labels_out_of_range_are_refused_not_wrapped():
    with pytest.raises(ValueError, match=r"^labels must lie in \[0, 3\), got -1 \(1 of 2 outside\)$"):
        M.zeroshot_accuracy(np.eye(3)[:2], [-1, 0], np.eye(3))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\), got 3"):
        M.zeroshot_accuracy(np.eye(3)[:2], [3, 0], np.eye(3))
    x, y = np.eye(3), np.array([0, 1, 2])
    for probe in (M.linear_probe_accuracy, M.logistic_probe_accuracy):
        with pytest.raises(ValueError, match=r"^train labels must lie in \[0, 3\), got -1"):
            probe(x, [0, 1, -1], x, y, 3)
        with pytest.raises(ValueError, match=r"^test labels must lie in \[0, 3\), got 5"):
            probe(x, y, x, [0, 5, 1], 3)
    with pytest.raises(ValueError, match=r"^train labels must lie in \[0, 3\), got -1"):
        M.knn_accuracy(x, [0, 1, -1], x, y, k=1)  # classes inferred from the labels: -1 still refused
    with pytest.raises(ValueError, match=r"^train labels must lie in \[0, 2\), got 2"):
        M.knn_accuracy(x, [0, 1, 2], x, [0, 1, 1], k=1, num_classes=2)


@pytest.mark.parametrize("k", [0, -5, 1.5, True])
def test_knn_k_must_be_a_positive_integer(k):
    x, y = np.eye(3), np.array([0, 1, 2])
    with pytest.raises(ValueError, match=r"^k must be an integer >= 1, got"):
        M.knn_accuracy(x, y, x, y, k=k)


def test_top_k_must_be_a_positive_integer():
    with pytest.raises(ValueError, match=r"^ks must be an integer >= 1, got 0$"):
        M.zeroshot_accuracy(np.eye(3), [0, 1, 2], np.eye(3), ks=(1, 0))
    with pytest.raises(ValueError, match=r"^ks must be an integer >= 1, got -1$"):
        M.retrieval_recall(np.eye(3), np.eye(3), [0, 1, 2], ks=(-1,))


def test_empty_sets_are_refused():
    x, y, none = np.eye(3), np.array([0, 1, 2]), np.zeros((0, 3))
    for probe in (M.linear_probe_accuracy, M.logistic_probe_accuracy):
        with pytest.raises(ValueError, match="^no train examples"):
            probe(none, [], x, y, 3)
        with pytest.raises(ValueError, match="^no test examples"):
            probe(x, y, none, [], 3)
    with pytest.raises(ValueError, match="^no train examples"):
        M.knn_accuracy(none, [], x, y, k=1, num_classes=3)
    with pytest.raises(ValueError, match="^no test examples"):
        M.knn_accuracy(x, y, none, [], k=1)
    with pytest.raises(ValueError, match="^no image embeddings"):
        M.zeroshot_accuracy(none, [], np.eye(3))
    with pytest.raises(ValueError, match="^no captions"):
        M.retrieval_recall(x, none, [])
    with pytest.raises(ValueError, match="^2 train embeddings but 3 train labels"):
        M.linear_probe_accuracy(x[:2], y, x, y, 3)


def test_probes_drop_nan_train_rows_and_miss_nan_test_rows():
    rng = np.random.default_rng(0)
    centers = 3.0 * rng.normal(size=(4, 16))
    trx, try_ = _clusters(rng, 20, centers, 0.5)
    tex, tey = _clusters(rng, 10, centers, 0.5)
    bad_train, bad_test = [0, 21, 79], [5, 6, 39]
    dirty_trx, dirty_tex = trx.copy(), tex.copy()
    dirty_trx[bad_train, 3] = np.nan
    dirty_tex[bad_test, 0] = np.inf
    clean_train = np.delete(np.arange(80), bad_train)
    for probe in (M.linear_probe_accuracy, lambda *a, **kw: M.knn_accuracy(*a[:4], k=5, num_classes=a[4], **kw)):
        with pytest.raises(ValueError, match="^3 of 80 train embeddings are not finite"):
            probe(dirty_trx, try_, tex, tey, 4)
        with pytest.raises(ValueError, match="^3 of 40 test embeddings are not finite"):
            probe(trx, try_, dirty_tex, tey, 4)
        # Separable clusters: the finite test rows are all right, the three non-finite ones wrong.
        assert probe(trx[clean_train], try_[clean_train], tex, tey, 4) == 1.0
        assert probe(dirty_trx, try_, dirty_tex, tey, 4, nonfinite="wrong") == 37 / 40
        # Nothing finite to learn from: every answer is wrong.
        assert probe(np.full_like(trx, np.nan), try_, tex, tey, 4, nonfinite="wrong") == 0.0


def test_per_class_accuracy_counts_examples_without_a_prediction_as_wrong():
    conf = M.confusion_matrix([0, 0, 1], [0, 1, 1], 3)  # a fourth example, of class 0, had no prediction
    np.testing.assert_allclose(M.per_class_accuracy(conf, totals=[3, 1, 0]), [1 / 3, 1.0, np.nan])
    with pytest.raises(ValueError, match=r"^predictions must lie in \[0, 3\), got -1"):
        M.confusion_matrix([0], [-1], 3)
