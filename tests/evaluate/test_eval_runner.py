"""The evaluation runner with toy encoders: images embed as their mean colour, texts through a dict."""
import numpy as np
import pytest

from clus_jax.data.eval_sets import ClassificationSet, ProbeSet, RetrievalSet
from clus_jax.evaluate.runner import ClusterSet, evaluate, metric_names, run, sets_for

RED, GREEN, BLUE, GRAY = (255, 0, 0), (0, 255, 0), (0, 0, 255), (128, 128, 128)
ONEHOT = {"red": [1.0, 0, 0], "green": [0, 1.0, 0], "blue": [0, 0, 1.0]}


def solid(colors, jitter=0, seed=0):
    """uint8 [n, 4, 4, 3] images of solid colours, optionally with per-image colour jitter."""
    rng = np.random.default_rng(seed)
    base = np.array(colors, np.int64) + rng.integers(-jitter, jitter + 1, size=(len(colors), 3))
    return np.broadcast_to(np.clip(base, 0, 255)[:, None, None, :], (len(colors), 4, 4, 3)).astype(np.uint8)


class Encoders:
    """Records every call; embeddings are deliberately not normalised (the runner must normalise)."""

    def __init__(self, texts):
        self.texts = texts
        self.image_calls, self.text_calls = [], []

    def images(self, x):
        assert x.dtype == np.uint8 and x.ndim == 4
        self.image_calls.append(len(x))
        return 7.0 * x.reshape(len(x), -1, 3).mean(axis=1)

    def text(self, strings):
        assert isinstance(strings, list)
        self.text_calls.append(list(strings))
        return 3.0 * np.array([self.texts[s] for s in strings])


def zeroshot_set():
    return ClassificationSet(
        name="colors",
        images=solid([RED, RED, GREEN, BLUE, BLUE, GREEN]),
        labels=np.array([0, 0, 1, 2, 1, 2]),  # the last two are labelled wrongly
        classnames=["red", "green", "blue"],
        templates=["a photo of {}", "a {} thing"],
    )


def retrieval_set():
    return RetrievalSet(
        name="shapes",
        images=solid([RED, GREEN, BLUE, GRAY]),
        captions=["red", "crimson", "green", "blue", "grey"],
        caption_to_image=np.array([0, 0, 1, 2, 3]),
    )


def probe_set():
    colors = [RED, GREEN, BLUE]
    return ProbeSet(
        name="jitter",
        train_images=solid(colors * 10, jitter=20, seed=1),
        train_labels=np.tile(np.arange(3), 10),
        test_images=solid(colors * 3, jitter=20, seed=2),
        test_labels=np.array([0, 1, 2, 0, 1, 2, 1, 1, 2]),  # test image 6 is red but labelled 1
        num_classes=3,
    )


TEXTS = {
    **{f"a photo of {c}": v for c, v in ONEHOT.items()},
    **{f"a {c} thing": v for c, v in ONEHOT.items()},
    "red": [1.0, 0, 0], "crimson": [1.0, 0, 0], "green": [0, 1.0, 0], "blue": [0, 0, 1.0],
    "grey": [0, 0, 1.0],  # points at the blue image
}


def test_known_numbers_and_exact_keys():
    enc = Encoders(TEXTS)
    sets = [zeroshot_set(), retrieval_set(), probe_set()]
    out = evaluate(sets, enc.images, enc.text, knn_k=5)
    assert list(out) == metric_names(sets) == [
        "zeroshot/colors/top1", "zeroshot/colors/top5", "zeroshot/colors/mean_per_class_top1",
        "cluster/colors/kmeans_nmi", "cluster/colors/kmeans_ari", "cluster/colors/kmeans_purity",
        "retrieval/shapes/i2t_r1", "retrieval/shapes/i2t_r5", "retrieval/shapes/i2t_r10",
        "retrieval/shapes/t2i_r1", "retrieval/shapes/t2i_r5", "retrieval/shapes/t2i_r10",
        "probe/jitter/linear_top1", "probe/jitter/knn_top1",
    ]
    assert all(type(v) is float for v in out.values())
    assert out["zeroshot/colors/top1"] == pytest.approx(4 / 6)
    assert out["zeroshot/colors/top5"] == 1.0  # only 3 classes
    # The grey caption's true image (gray) ranks second behind blue: t2i misses it at 1 only. The gray image
    # scores all five captions equally, and its caption has the highest index: rank 4, a miss at 1 only.
    assert out["retrieval/shapes/t2i_r1"] == pytest.approx(4 / 5)
    assert out["retrieval/shapes/i2t_r1"] == pytest.approx(3 / 4)
    for key in ("i2t_r5", "i2t_r10", "t2i_r5", "t2i_r10"):
        assert out[f"retrieval/shapes/{key}"] == 1.0
    assert out["probe/jitter/linear_top1"] == pytest.approx(8 / 9)
    assert out["probe/jitter/knn_top1"] == pytest.approx(8 / 9)


def test_encoders_called_once_per_array_with_all_of_it():
    enc = Encoders(TEXTS)
    evaluate([zeroshot_set(), retrieval_set(), probe_set()], enc.images, enc.text)
    assert enc.image_calls == [6, 4, 30, 9]
    assert enc.text_calls == [
        ["a photo of red", "a red thing", "a photo of green", "a green thing", "a photo of blue", "a blue thing"],
        ["red", "crimson", "green", "blue", "grey"],
    ]


def test_templates_are_averaged():
    teal = ClassificationSet(name="teal", images=solid([(0, 240, 255), RED, BLUE]), labels=np.array([1, 0, 2]),
                             classnames=["red", "green", "blue"], templates=["a photo of {}", "a {} thing"])
    texts = dict(TEXTS)
    # "a photo of green" alone loses the teal image to blue (0.686 < 0.728); with "a {} thing" = green-blue
    # averaged in, green's classifier is (0, 0.924, 0.383), which scores 0.913 and wins.
    texts["a green thing"] = [0, 1.0, 1.0]
    enc = Encoders(texts)
    assert evaluate([teal], enc.images, enc.text)["zeroshot/teal/top1"] == 1.0
    texts["a green thing"] = [0, 1.0, 0]
    enc = Encoders(texts)
    assert evaluate([teal], enc.images, enc.text)["zeroshot/teal/top1"] == pytest.approx(2 / 3)


def test_errors():
    enc = Encoders(TEXTS)
    with pytest.raises(ValueError, match="share a name"):
        evaluate([retrieval_set(), retrieval_set()], enc.images, enc.text)
    bad = zeroshot_set()
    bad.templates = ["a photo"]
    with pytest.raises(ValueError, match="template"):
        evaluate([bad], enc.images, enc.text)
    with pytest.raises(ValueError, match="encoder returned shape"):
        evaluate([retrieval_set()], lambda x: np.ones((1, 3)), enc.text)
    with pytest.raises(TypeError, match="unsupported"):
        evaluate([object()], enc.images, enc.text)
    assert evaluate([], enc.images, enc.text) == {}


def test_sets_for_the_towers_a_run_trains():
    sets = [zeroshot_set(), retrieval_set(), probe_set()]
    assert sets_for(sets, ("image", "text")) == sets
    # Image-only: frozen-feature probes, and cluster quality on the classification sets.
    assert sets_for(sets, ("image",)) == [ClusterSet(sets[0]), sets[2]]
    assert sets_for(sets, ("text",)) == []


# ------------------------------------------------- non-finite embeddings, labels out of range, empty sets


def nan_rows(encode, rows):
    """``encode`` with the output rows ``rows`` of every call replaced by NaN."""
    def wrapped(inputs):
        out = np.array(encode(inputs), np.float64)
        out[rows] = np.nan
        return out
    return wrapped


def test_nan_images_are_scored_wrong_consistently_and_counted():
    enc = Encoders(TEXTS)
    evaluation = run([zeroshot_set()], nan_rows(enc.images, [0, 1]), enc.text)  # the two red images, both right
    out = evaluation.metrics
    assert list(out) == metric_names([zeroshot_set()])
    assert out["zeroshot/colors/top1"] == 2 / 6
    assert out["zeroshot/colors/top5"] == 4 / 6  # only 3 classes, yet a NaN image is still a miss
    # Labels [0, 0, 1, 2, 1, 2], predictions [-, -, 1, 2, 2, 1]: class 0 has no right answer left.
    a = evaluation.arrays["colors"]
    np.testing.assert_array_equal(a.confusion, [[0, 0, 0], [0, 1, 1], [0, 1, 1]])
    np.testing.assert_allclose(a.per_class_accuracy, [0.0, 0.5, 0.5])  # ratios of small counts: exact
    assert out["zeroshot/colors/mean_per_class_top1"] == pytest.approx(1 / 3)
    assert evaluation.nonfinite_embeddings == 2


def test_all_nan_images_score_nothing_right():
    enc = Encoders(TEXTS)
    sets = [zeroshot_set(), retrieval_set(), probe_set()]
    evaluation = run(sets, nan_rows(enc.images, slice(None)), enc.text, knn_k=5)
    out = evaluation.metrics
    assert list(out) == metric_names(sets)
    cluster = {"cluster/colors/kmeans_nmi": 0.0, "cluster/colors/kmeans_ari": 0.0,
               "cluster/colors/kmeans_purity": 2 / 6}  # one cluster of all six: the largest class has two
    assert out == {k: cluster.get(k, 0.0) for k in out}
    assert evaluation.nonfinite_embeddings == 6 + 4 + 30 + 9


def test_nonfinite_raise_names_the_set_and_the_count():
    enc = Encoders(TEXTS)
    with pytest.raises(ValueError, match=r"^set 'colors': 2 of 6 image embeddings are not finite \(NaN or inf\)$"):
        evaluate([zeroshot_set()], nan_rows(enc.images, [0, 1]), enc.text, nonfinite="raise")
    with pytest.raises(ValueError, match=r"^set 'shapes': 1 of 5 text embeddings are not finite"):
        evaluate([retrieval_set()], enc.images, nan_rows(enc.text, [4]), nonfinite="raise")
    with pytest.raises(ValueError, match="nonfinite must be one of"):
        evaluate([], enc.images, enc.text, nonfinite="skip")


def test_labels_out_of_range_k_and_empty_sets_are_errors_naming_the_set():
    enc = Encoders(TEXTS)
    bad = zeroshot_set()
    bad.labels = np.array([-1, 0, 1, 2, 1, 2])
    with pytest.raises(ValueError, match=r"^set 'colors': labels must lie in \[0, 3\), got -1 \(1 of 6 outside\)$"):
        evaluate([bad], enc.images, enc.text)
    with pytest.raises(ValueError, match=r"^set 'colors': labels must lie in \[0, 3\), got -1"):
        evaluate([ClusterSet(bad)], enc.images, enc.text)
    probe = probe_set()
    probe.train_labels = np.tile([0, 1, -1], 10)
    with pytest.raises(ValueError, match=r"^set 'jitter': train labels must lie in \[0, 3\), got -1"):
        evaluate([probe], enc.images, enc.text)
    with pytest.raises(ValueError, match=r"^k must be an integer >= 1, got 0$"):
        evaluate([probe_set()], enc.images, enc.text, knn_k=0)
    empty = probe_set()
    empty.train_images, empty.train_labels = empty.train_images[:0], empty.train_labels[:0]
    with pytest.raises(ValueError, match=r"^set 'jitter': no train images: an empty set has no score$"):
        evaluate([empty], enc.images, enc.text)


def test_the_embedded_evaluator_adds_the_count_of_nonfinite_embeddings(monkeypatch):
    import ml_collections

    from clus_jax.evaluate import embedded, registry

    sets = [zeroshot_set(), retrieval_set()]
    monkeypatch.setattr(embedded, "load_sets", lambda config: sets)
    enc = Encoders(TEXTS)
    settings = ml_collections.ConfigDict({"type": "embedded", "knn_k": 5, "entry": "embedded"})
    healthy = evaluate(sets, enc.images, enc.text)
    for encode_images, count in ((enc.images, 0.0), (nan_rows(enc.images, [0]), 2.0)):  # one per set
        ctx = registry.EvalContext(encode_images, enc.text, ("image", "text"), {}, ml_collections.ConfigDict())
        out = embedded.Embedded().run(settings, ctx).metrics
        assert list(out) == metric_names(sets) + ["eval/nonfinite_embeddings"]
        assert out["eval/nonfinite_embeddings"] == count
    ctx = registry.EvalContext(enc.images, enc.text, ("image", "text"), {}, ml_collections.ConfigDict())
    assert {k: v for k, v in embedded.Embedded().run(settings, ctx).metrics.items() if k.count("/") == 2} == healthy
