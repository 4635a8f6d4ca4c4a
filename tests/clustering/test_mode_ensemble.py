"""MoDE's assignment, membership and ensemble rules against a NumPy transcription of MetaCLIP's steps.

The oracle functions below transcribe facebookresearch/MetaCLIP ``apps/mode`` step by step in float64 with
explicit pairwise differences (``torch.cdist``), Python loops over experts and ``scipy.special.softmax``:
``post_report_ensemble.main`` (nearest fine centre per class, grouping by the coarse cluster of that
centre, the sharpen constants, ``softmax(w / 8)``), ``prep_inference``'s nearest fine centre of each
L2-normalised feature, the greedy ``KMeans.predict`` of each fine centre, balanced-kmeans'
``pairwise_cosine`` and ``mode_wds.dataset_filter`` with ``ooc_ratio`` 0. None of them calls the module.
"""
import numpy as np
import pytest
from scipy.special import softmax

from clus_jax.clustering import mode_ensemble as me

import tolerances  # registered by tests/conftest.py


# ---------------------------------------------------------------------------------------------------------
# Oracles
# ---------------------------------------------------------------------------------------------------------


def cdist(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1))


def cosine_distance(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    a = a / np.linalg.norm(a, axis=-1, keepdims=True)
    b = b / np.linalg.norm(b, axis=-1, keepdims=True)
    return 1.0 - (a[:, None, :] * b[None, :, :]).sum(-1)


def reference_ensemble_weights(task_embedding, fine_cluster, hrchy_assign):
    """post_report_ensemble.main for one dataset, smooth_weight = [5.0, 8.0], too_many_class = 200."""
    d = cdist(task_embedding, fine_cluster)
    dist, assign = d.min(axis=-1), d.argmin(axis=-1)
    n_class = len(assign)
    hrchy_avg = hrchy_assign[np.array(assign)]
    soft_avg = {key: np.array(dist)[hrchy_avg == key] for key in np.unique(hrchy_assign).tolist()}
    weight_soft_unit = np.zeros(len(soft_avg))
    for key, item in soft_avg.items():
        if len(item) > 0:
            sharpen_add = np.exp(0.5 - np.sqrt(n_class)) if n_class < 10 else 0.0
            sharpen_mul = 5.0 * np.log10(max(10, n_class - 200))
            weight_soft_unit[key] = np.exp((sharpen_add - item) * sharpen_mul).sum()
    return softmax(weight_soft_unit / 8.0)


def reference_fine_assignment(features, fine_cluster, metric):
    x = np.asarray(features, np.float64)
    x = x / np.linalg.norm(x, axis=-1, keepdims=True)
    return (cdist(x, fine_cluster) if metric == "euclidean" else cosine_distance(x, fine_cluster)).argmin(-1)


def reference_members(fine_assign, hrchy_assign, coarse_idx):
    """dataset_filter with ooc_ratio 0: records whose fine cluster is one of expert coarse_idx's."""
    ic_idx = [i for i, a in enumerate(hrchy_assign.tolist()) if a == coarse_idx]
    index = (np.array(fine_assign)[:, None] == np.array(ic_idx)[None]).sum(axis=-1) == 1
    return np.flatnonzero(index)


def make_hierarchy(rng, num_fine, num_experts, dim):
    """Unit-ish fine centres and a fine->coarse map that gives every expert at least one fine centre."""
    fine = rng.normal(size=(num_fine, dim))
    fine /= np.linalg.norm(fine, axis=-1, keepdims=True)
    fine *= rng.uniform(0.7, 1.0, size=(num_fine, 1))  # means of unit vectors are shorter than 1
    fine_to_coarse = rng.permutation(np.arange(num_fine) % num_experts)
    return fine.astype(np.float32), fine_to_coarse


# ---------------------------------------------------------------------------------------------------------
# mode_ensemble_weights: every branch of the rule (n_class < 10, = 10, 100, 210 at the max(10, .) edge, 1000)
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_experts", [2, 4])
@pytest.mark.parametrize("n_class", [1, 3, 9, 10, 100, 205, 210, 1000])
def test_ensemble_weights_equal_post_report_ensemble(n_class, num_experts):
    rng = np.random.default_rng(1000 * n_class + num_experts)
    fine, fine_to_coarse = make_hierarchy(rng, 24, num_experts, 12)
    # class embeddings near a few fine centres (mostly of one expert), so the weights are far from uniform
    near = rng.choice(np.flatnonzero(fine_to_coarse == 0), size=n_class)
    elsewhere = rng.random(n_class) < 0.3
    near[elsewhere] = rng.integers(0, 24, size=elsewhere.sum())
    task = fine[near] + rng.normal(scale=rng.uniform(0.05, 0.4), size=(n_class, 12))
    task = (task / np.linalg.norm(task, axis=-1, keepdims=True)).astype(np.float32)
    got = me.mode_ensemble_weights(task, fine, fine_to_coarse, num_experts)
    want = reference_ensemble_weights(task, fine, fine_to_coarse)
    assert got.shape == (num_experts,)
    # float64 on both sides: the distances are recomputed in float64 from the same float32 inputs.
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)
    assert abs(got.sum() - 1.0) < 1e-12


def test_ensemble_weights_by_hand():
    # Two classes (n_class < 10): a = exp(0.5 - sqrt 2), b = 5 log10(10) = 5. Fine centres on the axes.
    fine = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]], np.float32)
    fine_to_coarse = np.array([0, 1, 1])
    task = np.array([[0.6, 0.0], [0.0, 0.0]], np.float32)  # d = 0.4 to centre 0; d = 1 to centre 0 (tie -> 0)
    a, b = np.exp(0.5 - np.sqrt(2.0)), 5.0
    w = np.array([np.exp((a - 0.4) * b) + np.exp((a - 1.0) * b), 0.0, 0.0])  # expert 2 does not exist here
    want = np.exp(w[:2] / 8.0) / np.exp(w[:2] / 8.0).sum()
    # float32 0.6 is 0.6 (1 +- u): d moves by 0.6 u, the scores by a factor exp(+-0.6 u b), the softmax inputs
    # w / 8 by delta = 0.6 u b w_0 / 8 and the weights by at most 2 delta, relative (the rest is float64).
    rtol = 2 * 0.6 * tolerances.U32 * b * w[0] / 8.0
    np.testing.assert_allclose(me.mode_ensemble_weights(task, fine, fine_to_coarse, 2), want, rtol=rtol)
    # A third expert no class reaches scores 0 (exp(0) in the softmax), like expert 1 here.
    three = me.mode_ensemble_weights(task, fine, fine_to_coarse, 3)
    assert three[1] == three[2] and three[0] > three[1]


def test_retrieval_weights_are_one_class_tasks():
    rng = np.random.default_rng(5)
    fine, fine_to_coarse = make_hierarchy(rng, 16, 4, 8)
    queries = rng.normal(size=(7, 8)).astype(np.float32)
    got = me.retrieval_weights(queries, fine, fine_to_coarse, 4)
    assert got.shape == (7, 4)
    for q in range(7):  # float64 on both sides, from the same float32 queries
        np.testing.assert_allclose(got[q], reference_ensemble_weights(queries[q:q + 1], fine, fine_to_coarse),
                                   rtol=1e-9)


def test_ensemble_logits_task_and_per_query_weights():
    rng = np.random.default_rng(6)
    logits = rng.normal(size=(3, 5, 4))
    w = np.array([0.5, 0.3, 0.2])
    want = sum(w[k] * logits[k] for k in range(3))  # float64 logits and weights: a 3-term sum differs by ~1e-16
    np.testing.assert_allclose(me.ensemble_logits(logits, w), want, rtol=1e-12)
    per_query = rng.dirichlet(np.ones(3), size=5)
    want_q = np.stack([sum(per_query[n, k] * logits[k, n] for k in range(3)) for n in range(5)])
    np.testing.assert_allclose(me.ensemble_logits(logits, per_query), want_q, rtol=1e-12)
    with pytest.raises(ValueError, match="weights must be"):
        me.ensemble_logits(logits, np.ones(4))


# ---------------------------------------------------------------------------------------------------------
# Assignment and membership
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
@pytest.mark.parametrize("num_experts", [2, 4])
def test_fine_and_coarse_assignment_and_membership(metric, num_experts):
    rng = np.random.default_rng(num_experts + (10 if metric == "cosine" else 0))
    num_fine, dim = 32, 16
    fine, _ = make_hierarchy(rng, num_fine, num_experts, dim)  # norms 0.7-1: scaling a feature moves it
    coarse = rng.normal(size=(num_experts, dim)).astype(np.float32)
    features = (rng.normal(size=(3000, dim)) * rng.uniform(0.1, 5.0, size=(3000, 1))).astype(np.float32)

    fine_ids = me.nearest_centers(me.l2_normalize(features), fine, metric)[0]
    np.testing.assert_array_equal(fine_ids, reference_fine_assignment(features, fine, metric))
    np.testing.assert_array_equal(me.fine_assignment(features, fine, metric), fine_ids)

    distance = cdist if metric == "euclidean" else cosine_distance
    fine_to_coarse = me.coarse_assignment(fine, coarse, metric)
    np.testing.assert_array_equal(fine_to_coarse, distance(fine, coarse).argmin(-1))

    members = me.expert_membership(fine_ids, fine_to_coarse, num_experts, ooc_ratio=0.0)
    assert len(members) == num_experts
    for c in range(num_experts):
        np.testing.assert_array_equal(members[c], reference_members(fine_ids, fine_to_coarse, c))
    assert sum(len(m) for m in members) == len(features)  # with ooc_ratio 0 the experts partition the records


def test_nearest_center_distances_are_exact():
    rng = np.random.default_rng(8)
    x = rng.normal(size=(50, 6)).astype(np.float32) + 10.0  # far from the origin: cancellation in |x|^2 - 2xc
    centers = rng.normal(size=(5, 6)).astype(np.float32) + 10.0
    ids, dist = me.nearest_centers(x, centers)
    d = cdist(x, centers)
    np.testing.assert_array_equal(ids, d.argmin(-1))
    # float64 on both sides: the chosen centre's distance is recomputed in float64 from the float32 inputs.
    np.testing.assert_allclose(dist, d.min(-1), rtol=1e-12)
    ids_c, dist_c = me.nearest_centers(x, centers, "cosine")
    np.testing.assert_allclose(dist_c, cosine_distance(x, centers).min(-1), rtol=1e-9, atol=1e-12)


def test_out_of_cluster_records_are_seeded_and_per_expert():
    rng = np.random.default_rng(9)
    fine_to_coarse = np.array([0, 1, 2, 0, 1, 2, 0, 1])
    fine_ids = rng.integers(0, 8, size=5000)
    members = me.expert_membership(fine_ids, fine_to_coarse, 3, ooc_ratio=0.1, seed=3)
    for c in range(3):
        inside = np.flatnonzero(fine_to_coarse[fine_ids] == c)
        others = len(fine_ids) - len(inside)
        assert np.all(np.isin(inside, members[c]))  # every own record is kept
        assert len(members[c]) == len(inside) + int(others * 0.1)  # plus int(ooc_ratio * #others) others
        assert np.all(np.diff(members[c]) > 0)  # sorted, no repeats
    again = me.expert_membership(fine_ids, fine_to_coarse, 3, ooc_ratio=0.1, seed=3)
    other_seed = me.expert_membership(fine_ids, fine_to_coarse, 3, ooc_ratio=0.1, seed=4)
    assert all(np.array_equal(a, b) for a, b in zip(members, again))
    assert not np.array_equal(members[0], other_seed[0])


def test_bad_inputs_are_named():
    fine = np.eye(3, dtype=np.float32)
    with pytest.raises(ValueError, match="metric"):
        me.fine_assignment(fine, fine, metric="manhattan")
    with pytest.raises(ValueError, match=r"fine_to_coarse values must lie in \[0, 2\)"):
        me.mode_ensemble_weights(fine, fine, np.array([0, 1, 2]), 2)
    with pytest.raises(ValueError, match="ooc_ratio"):
        me.expert_membership(np.array([0, 1]), np.array([0, 1, 1]), 2, ooc_ratio=1.5)
    with pytest.raises(ValueError, match="fine_ids"):
        me.expert_membership(np.array([0, 3]), np.array([0, 1, 1]), 2)
    with pytest.raises(ValueError, match="share D"):
        me.nearest_centers(np.ones((2, 3)), np.ones((2, 4)))


def test_fine_assignment_on_a_mesh():
    import jax
    from clus_jax.parallel.mesh import create_mesh
    rng = np.random.default_rng(11)
    fine, _ = make_hierarchy(rng, 12, 2, 8)
    features = rng.normal(size=(200, 8)).astype(np.float32) * 3.0
    mesh = create_mesh({"data": 2, "fsdp": 1, "tensor": 4}, jax.devices()[:8])  # records x centres split
    np.testing.assert_array_equal(me.fine_assignment(features, fine, mesh=mesh),
                                  reference_fine_assignment(features, fine, "euclidean"))
