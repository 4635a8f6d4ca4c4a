"""Cluster quality in the evaluation: k-means and cluster-head assignments of the image embeddings, scored
against the labels, through the runner with toy encoders whose embeddings are known.

NMI, ARI and purity themselves are tested in tests/clustering (hand-computed values, label permutations);
here the figures are hand-computed for the wiring: which embeddings are clustered, with which k and which
heads, under which names (a head's name is the objective's: the swap banks are 'bank_<i>'). The scores are
float64 functions of integer assignments and counts, so ``pytest.approx``'s relative 1e-6 is far above their
rounding on any processor.
"""
import numpy as np
import pytest

from clus_jax.evaluate import cluster_eval
from clus_jax.data.eval_sets import ClassificationSet
from clus_jax.evaluate.runner import ClusterSet, evaluate, metric_names, run

NUM_CLASSES = 4
LABELS = np.array([0, 1, 2, 3, 0, 1, 2, 3, 2, 0, 3, 1])
CLASSNAMES = ["w", "x", "y", "z"]


def onehot_set(labels=LABELS, name="toy"):
    """Images that encode their label: pixel value = label, so the toy encoder can embed them as one-hots."""
    images = np.broadcast_to(np.asarray(labels, np.uint8)[:, None, None, None], (len(labels), 2, 2, 3)).copy()
    return ClassificationSet(name=name, images=images, labels=np.asarray(labels), classnames=CLASSNAMES,
                             templates=["{}"])


def onehot_images(images):
    return np.eye(NUM_CLASSES)[images[:, 0, 0, 0].astype(int)]


def onehot_texts(texts):
    return np.eye(NUM_CLASSES)[[CLASSNAMES.index(t) for t in texts]]


def test_class_one_hot_embeddings_cluster_perfectly_by_kmeans_and_by_a_head_of_class_rows():
    # Bank 0: one row per class, in a shuffled order and of unequal lengths (rows are re-normalised).
    # Bank 1: the first two classes share a prototype, the others get one each, plus an unused row.
    bank_0 = np.eye(NUM_CLASSES)[[2, 0, 3, 1]] * np.array([[3.0], [0.5], [1.0], [7.0]])
    bank_1 = np.array([[1.0, 1.0, 0, 0], [0, 0, 1.0, 0], [0, 0, 0, 1.0], [-1.0, -1.0, -1.0, -1.0]])
    out = evaluate([onehot_set()], onehot_images, onehot_texts, heads={"bank_0": bank_0, "bank_1": bank_1})
    names = metric_names([onehot_set()], ["bank_0", "bank_1"])
    assert list(out) == names
    assert [k for k in names if k.startswith("cluster/")] == [
        f"cluster/toy/{source}_{score}" for source in ("kmeans", "bank_0", "bank_1") for score in ("nmi", "ari", "purity")]
    for source in ("kmeans", "bank_0"):
        assert out[f"cluster/toy/{source}_nmi"] == pytest.approx(1.0)
        assert out[f"cluster/toy/{source}_ari"] == pytest.approx(1.0)
        assert out[f"cluster/toy/{source}_purity"] == 1.0
    # Bank 1 merges classes w and x (3 examples each of 12): by hand,
    # purity = (3 + 3 + 3) / 12; H(T) = log 4, H(P) = -(1/2 log 1/2 + 2 * 1/4 log 1/4) = 1.5 log 2,
    # I = H(T) - H(T|P) = 2 log 2 - 1/2 log 2 = 1.5 log 2, so NMI = 1.5 / ((2 + 1.5) / 2) = 6/7;
    # ARI: pairs inside cells 4 * C(3,2) = 12, within classes 4 * C(3,2) = 12, within clusters C(6,2) + 2 * 3 = 21;
    # expected 12 * 21 / 66, max (12 + 21) / 2, ARI = (12 - 252/66) / (16.5 - 252/66).
    assert out["cluster/toy/bank_1_purity"] == pytest.approx(9 / 12)
    assert out["cluster/toy/bank_1_nmi"] == pytest.approx(6 / 7)
    assert out["cluster/toy/bank_1_ari"] == pytest.approx((12 - 252 / 66) / (16.5 - 252 / 66))


def test_hand_computed_scores_for_a_zero_shot_set_with_wrong_labels():
    # Six images of three distinct embeddings, labelled [0, 0, 1, 2, 1, 2]: k-means (k = 3 classes) finds
    # the three embeddings: clusters {0, 1}, {2, 5}, {3, 4}. By hand: purity = (2 + 1 + 1) / 6;
    # NMI = (log 3 - 2/3 log 2) / log 3; ARI: 1 pair inside cells, 3 within classes, 3 within clusters,
    # 15 in all: (1 - 9/15) / (3 - 9/15) = 1/6. Zero-shot: predictions = embeddings [0, 0, 1, 2, 2, 1].
    labels = np.array([0, 0, 1, 2, 1, 2])
    embedding_of = np.array([0, 0, 1, 2, 2, 1])
    images = np.broadcast_to(embedding_of.astype(np.uint8)[:, None, None, None], (6, 2, 2, 3)).copy()
    s = ClassificationSet(name="wrong", images=images, labels=labels, classnames=CLASSNAMES[:3], templates=["{}"])
    evaluation = run([s], lambda x: np.eye(3)[x[:, 0, 0, 0]], lambda t: np.eye(3)[[CLASSNAMES.index(c) for c in t]])
    out = evaluation.metrics
    assert out["cluster/wrong/kmeans_purity"] == pytest.approx(4 / 6)
    assert out["cluster/wrong/kmeans_nmi"] == pytest.approx((np.log(3) - 2 / 3 * np.log(2)) / np.log(3))
    assert out["cluster/wrong/kmeans_ari"] == pytest.approx(1 / 6)
    assert out["zeroshot/wrong/top1"] == pytest.approx(4 / 6)
    assert out["zeroshot/wrong/mean_per_class_top1"] == pytest.approx((1 + 0.5 + 0.5) / 3)
    a = evaluation.arrays["wrong"]
    np.testing.assert_array_equal(a.confusion, [[2, 0, 0], [0, 1, 1], [0, 1, 1]])
    np.testing.assert_allclose(a.per_class_accuracy, [1.0, 0.5, 0.5])
    assert a.classnames == CLASSNAMES[:3] and a.projection.shape == (6, 2)
    np.testing.assert_array_equal(a.labels, labels)


def test_relabelling_the_classes_changes_no_cluster_score():
    rng = np.random.default_rng(0)  # the shapes of the one-hot test: k-means compiles once for both
    embeddings = rng.normal(size=(len(LABELS), NUM_CLASSES))
    labels = LABELS
    bank = rng.normal(size=(6, NUM_CLASSES))
    renamed = np.array([3, 0, 2, 1])[labels]
    a = cluster_eval.cluster_metrics("s", embeddings, labels, 4, {"bank_0": bank})
    b = cluster_eval.cluster_metrics("s", embeddings, renamed, 4, {"bank_0": bank})
    assert a == pytest.approx(b)
    # Permuting the bank's rows renames its clusters only.
    c = cluster_eval.cluster_metrics("s", embeddings, labels, 4, {"bank_0": bank[::-1]})
    assert {k: v for k, v in c.items() if "bank" in k} == pytest.approx({k: v for k, v in a.items() if "bank" in k})


def test_head_assignment_uses_unit_rows():
    # Unnormalised, the long row 1 would win both points; with unit rows each point takes its own row.
    bank = np.array([[1.0, 0.0], [10.0, 10.0]])
    x = np.array([[1.0, 0.0], [0.6, 0.8]])
    np.testing.assert_array_equal(cluster_eval.head_assignments(x, bank), [0, 1])


def test_mean_per_class_accuracy_weights_every_class_equally():
    # Four images of class 0 (all right), one each of classes 1 (right) and 2 (predicted 1): top-1 5/6,
    # mean per-class (1 + 1 + 0) / 3. Same shapes as the hand-computed test (k-means compiles once).
    embedding_of = np.array([0, 0, 0, 0, 1, 1])
    images = np.broadcast_to(embedding_of.astype(np.uint8)[:, None, None, None], (6, 2, 2, 3)).copy()
    s = ClassificationSet(name="unbalanced", images=images, labels=np.array([0, 0, 0, 0, 1, 2]),
                          classnames=CLASSNAMES[:3], templates=["{}"])
    out = evaluate([s], lambda x: np.eye(3)[x[:, 0, 0, 0]], lambda t: np.eye(3)[[CLASSNAMES.index(c) for c in t]])
    assert out["zeroshot/unbalanced/top1"] == pytest.approx(5 / 6)
    assert out["zeroshot/unbalanced/mean_per_class_top1"] == pytest.approx(2 / 3)


def test_an_image_only_run_gets_cluster_quality_of_the_classification_sets():
    def no_text(texts):
        raise AssertionError("an image-only run has no text tower")

    bank = np.eye(NUM_CLASSES)
    sets = [ClusterSet(onehot_set())]
    out = evaluate(sets, onehot_images, no_text, heads={"bank_0": bank})
    assert list(out) == metric_names(sets, ["bank_0"]) == cluster_eval.metric_names("toy", ["bank_0"])
    assert out == pytest.approx({k: 1.0 for k in out})


def test_nonfinite_embeddings_are_refused_naming_the_set_or_put_in_one_extra_cluster():
    embeddings = np.eye(NUM_CLASSES)[LABELS]
    embeddings[[0, 5]] = np.nan  # a class-0 and a class-1 point
    with pytest.raises(ValueError, match=r"^set 'toy': 2 of 12 image embeddings are not finite \(NaN or inf\)$"):
        cluster_eval.cluster_metrics("toy", embeddings, LABELS, NUM_CLASSES)
    out = cluster_eval.cluster_metrics("toy", embeddings, LABELS, NUM_CLASSES, {"bank_0": np.eye(NUM_CLASSES)},
                                       nonfinite="wrong")
    # The ten finite points cluster by class (k-means and the head alike); the two NaN ones form a fifth
    # cluster. By hand: purity (2 + 2 + 3 + 3 + 1) / 12; ARI: pairs inside cells 1 + 1 + 3 + 3 = 8, within
    # classes 4 * C(3,2) = 12, within clusters 1 + 1 + 3 + 3 + 1 = 9, 66 in all: expected 12 * 9 / 66.
    expected = 12 * 9 / 66
    for source in ("kmeans", "bank_0"):
        assert out[f"cluster/toy/{source}_purity"] == pytest.approx(11 / 12)
        assert out[f"cluster/toy/{source}_ari"] == pytest.approx((8 - expected) / (10.5 - expected))
        assert out[f"cluster/toy/{source}_nmi"] < 1.0
    every = cluster_eval.cluster_metrics("toy", np.full((12, 4), np.nan), LABELS, NUM_CLASSES, nonfinite="wrong")
    assert every == {"cluster/toy/kmeans_nmi": 0.0, "cluster/toy/kmeans_ari": 0.0, "cluster/toy/kmeans_purity": 3 / 12}


def test_labels_out_of_range_and_empty_sets_are_refused():
    embeddings = np.eye(NUM_CLASSES)[LABELS]
    bad = LABELS.copy()
    bad[3] = -1
    with pytest.raises(ValueError, match=r"^set 'toy': labels must lie in \[0, 4\), got -1 \(1 of 12 outside\)$"):
        cluster_eval.cluster_metrics("toy", embeddings, bad, NUM_CLASSES)
    with pytest.raises(ValueError, match=r"^set 'toy': 0 embeddings and 0 labels"):
        cluster_eval.cluster_metrics("toy", embeddings[:0], LABELS[:0], NUM_CLASSES)
