"""Quality figures against hand-computed values and their invariances (label permutation, renaming)."""
import math

import numpy as np
import pytest

from clus_jax.clustering import quality

# true = two classes of three; pred = three clusters of two. Contingency [[2, 1, 0], [0, 1, 2]].
TRUE = np.array([0, 0, 0, 1, 1, 1])
PRED = np.array([0, 0, 1, 1, 2, 2])


def test_nmi_hand_computed():
    # I = 2 * (2/6) ln((2/6) / (1/2 * 1/3)) + 2 * (1/6) ln(1) = (2/3) ln 2; H(T) = ln 2, H(P) = ln 3.
    expected = (2 / 3) * math.log(2) / ((math.log(2) + math.log(3)) / 2)
    assert quality.nmi(TRUE, PRED) == pytest.approx(expected, abs=1e-12)
    assert quality.nmi(PRED, TRUE) == pytest.approx(expected, abs=1e-12)


def test_ari_hand_computed():
    # sum C(n_ij, 2) = 2, rows 2 * C(3, 2) = 6, cols 3 * C(2, 2) = 3, C(6, 2) = 15:
    # expected 6 * 3 / 15 = 1.2, max (6 + 3) / 2 = 4.5, ARI = (2 - 1.2) / (4.5 - 1.2).
    assert quality.adjusted_rand_index(TRUE, PRED) == pytest.approx(0.8 / 3.3, abs=1e-12)


def test_purity_hand_computed():
    assert quality.purity(TRUE, PRED) == pytest.approx(5 / 6)
    assert quality.purity(PRED, TRUE) == pytest.approx(4 / 6)  # two clusters: majorities 2 and 2 of 3 each


def test_perfect_and_trivial_partitions():
    labels = np.array([3, 3, 7, 7, 9])
    assert quality.nmi(labels, labels) == pytest.approx(1.0)
    assert quality.adjusted_rand_index(labels, labels) == pytest.approx(1.0)
    assert quality.purity(labels, labels) == 1.0
    ones = np.zeros(5, int)
    assert quality.nmi(ones, ones) == 1.0
    assert quality.nmi(labels, ones) == pytest.approx(0.0)
    assert quality.adjusted_rand_index(labels, ones) == pytest.approx(0.0)


def test_ari_of_a_known_worse_than_chance_pair():
    # [[1, 1], [1, 1]]: no agreeing pair beyond chance. sum_cells 0, rows 2, cols 2, C(4,2) 6:
    # expected 4/6, max 2 -> (0 - 2/3) / (2 - 2/3) = -0.5.
    assert quality.adjusted_rand_index([0, 0, 1, 1], [0, 1, 0, 1]) == pytest.approx(-0.5)


def test_invariant_under_label_permutation_and_renaming():
    rng = np.random.default_rng(0)
    true = rng.integers(0, 5, 200)
    pred = (true + (rng.random(200) < 0.3) * rng.integers(0, 7, 200)) % 7
    perm = rng.permutation(7)
    renamed = np.array(["c%d" % p for p in perm[pred]])
    for fn in (quality.nmi, quality.adjusted_rand_index, quality.purity):
        assert fn(true, perm[pred]) == pytest.approx(fn(true, pred), abs=1e-12)
        assert fn(true, renamed) == pytest.approx(fn(true, pred), abs=1e-12)
    order = rng.permutation(200)  # reordering the points changes nothing either
    assert quality.nmi(true[order], pred[order]) == pytest.approx(quality.nmi(true, pred), abs=1e-12)


def test_inertia_is_mean_squared_distance():
    points = np.array([[0.0, 0.0], [3.0, 4.0], [1.0, 1.0]])
    centers = np.array([[0.0, 0.0], [1.0, 0.0]])
    # distances^2: 0, 25 (to centre 0), 1 (to centre 1) -> mean 26 / 3
    assert quality.inertia(points, centers, np.array([0, 0, 1])) == pytest.approx(26 / 3)


def test_cluster_sizes_imbalance_and_empty():
    sizes = quality.cluster_sizes(np.array([0, 0, 0, 1, 3, 3]), k=4)
    np.testing.assert_array_equal(sizes.counts, [3, 1, 0, 2])
    assert sizes.imbalance == pytest.approx(3 / 1.5)
    assert sizes.fraction_empty == pytest.approx(0.25)
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        quality.cluster_sizes(np.array([4]), k=4)


def _ari_by_pairs(a, b) -> float:
    """Independent ARI: scikit-learn's ``adjusted_rand_score`` from the pair confusion counted over every
    ordered pair of distinct points (1.0 when no pair disagrees, the empty and one-point cases included)."""
    a, b = np.asarray(a), np.asarray(b)
    off = ~np.eye(len(a), dtype=bool)
    same_a, same_b = (a[:, None] == a[None, :])[off], (b[:, None] == b[None, :])[off]
    tp, fn = int(np.sum(same_a & same_b)), int(np.sum(same_a & ~same_b))
    fp, tn = int(np.sum(~same_a & same_b)), int(np.sum(~same_a & ~same_b))
    if fn == 0 and fp == 0:
        return 1.0
    return 2.0 * (tp * tn - fn * fp) / ((tp + fn) * (fn + tn) + (tp + fp) * (fp + tn))


@pytest.mark.parametrize("true,pred", [
    ([], []), ([4], [9]), ([0, 0], [0, 1]), ([0, 1], [0, 1]), ([0, 0, 0], [0, 1, 2]), ([0, 1, 2], [5, 6, 7]),
    ([0, 0, 1, 1], [0, 1, 0, 1]), ([0, 0, 1, 2], [0, 0, 1, 1]), (TRUE, PRED)])
def test_ari_matches_pair_counting_on_degenerate_and_small_inputs(true, pred):
    assert quality.adjusted_rand_index(true, pred) == pytest.approx(_ari_by_pairs(true, pred), abs=1e-12)


def test_ari_matches_pair_counting_on_random_labelings():
    rng = np.random.default_rng(0)
    for n in (2, 3, 10, 60):
        for _ in range(10):
            true, pred = rng.integers(0, 4, n), rng.integers(0, int(rng.integers(1, 6)), n)
            assert quality.adjusted_rand_index(true, pred) == pytest.approx(_ari_by_pairs(true, pred), abs=1e-12)


@pytest.mark.parametrize("labels", [[], [3], ["a"]])
def test_no_or_one_point_is_a_perfect_match_not_nan(labels):
    # scikit-learn: NMI and ARI of identical (here trivially so) partitions are 1.0; purity has nothing to miss.
    for fn in (quality.nmi, quality.adjusted_rand_index, quality.purity):
        assert fn(labels, labels[::-1]) == 1.0, fn.__name__
