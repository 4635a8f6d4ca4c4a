"""balanced_assign gives exact sizes at the optimum of the linear-assignment problem where each centre is
N / M slots (scipy.optimize.linear_sum_assignment); balanced k-means on skewed data gives equal clusters."""
import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment

from clus_jax.clustering import balanced_assign, kmeans
from clus_jax.clustering.balanced import squared_distances


def lap_optimum(cost):
    n, m = cost.shape
    rows, slots = linear_sum_assignment(np.repeat(cost, n // m, axis=1))
    return cost[rows, slots // (n // m)].sum()


@pytest.mark.parametrize("n,m,seed", [(12, 3, 0), (60, 4, 1), (120, 12, 2), (90, 1, 3), (40, 40, 4)])
def test_exact_sizes_at_the_lap_optimum(n, m, seed):
    cost = np.random.default_rng(seed).random((n, m))
    ids = balanced_assign(cost)
    np.testing.assert_array_equal(np.bincount(ids, minlength=m), np.full(m, n // m))
    assert cost[np.arange(n), ids].sum() <= lap_optimum(cost) + 1e-9


def test_integer_costs_with_ties():
    # Many equal costs (a degenerate LAP): the auction must still end, with the optimum.
    cost = np.random.default_rng(5).integers(0, 3, (48, 6)).astype(float)
    ids = balanced_assign(cost)
    np.testing.assert_array_equal(np.bincount(ids, minlength=6), np.full(6, 8))
    assert cost[np.arange(48), ids].sum() == pytest.approx(lap_optimum(cost), abs=1e-9)


def test_skewed_points_prefer_one_centre():
    # Every point is nearest to centre 0; a plain argmin would give all 30 to it.
    cost = np.concatenate([np.zeros((30, 1)), np.ones((30, 2))], axis=1) + np.linspace(0, 1e-3, 30)[:, None]
    ids = balanced_assign(cost)
    np.testing.assert_array_equal(np.bincount(ids, minlength=3), [10, 10, 10])


def test_rejects_indivisible_sizes():
    with pytest.raises(ValueError, match="N divisible by M; got N=10, M=3"):
        balanced_assign(np.zeros((10, 3)))


@pytest.mark.slow
def test_balanced_kmeans_on_skewed_data_gives_equal_clusters():
    rng = np.random.default_rng(6)
    # 90% of the points in one blob, the rest in three small ones.
    x = np.concatenate([rng.normal(size=(216, 4)) * 0.3, rng.normal(size=(24, 4)) * 0.3 + 5.0]).astype(np.float32)
    plain = kmeans(x, 4, num_iters=5, init=x[[0, 1, 216, 217]])
    assert plain.sizes.max() > 2 * plain.sizes.min()
    result = kmeans(x, 4, num_iters=5, init=x[[0, 1, 216, 217]], balanced=True)
    np.testing.assert_array_equal(result.sizes, [60, 60, 60, 60])
    np.testing.assert_array_equal(np.bincount(result.assignments, minlength=4), [60, 60, 60, 60])
    # The returned assignment is the optimal balanced one for the returned centres.
    cost = squared_distances(x, result.centers)
    assert cost[np.arange(len(x)), result.assignments].sum() <= lap_optimum(cost) + 1e-6
    with pytest.raises(ValueError, match="N divisible by k"):
        kmeans(x[:-1], 4, balanced=True)


class Interrupt(Exception):
    pass


def test_balanced_kmeans_resumes_from_its_checkpoint(tmp_path):
    x = np.random.default_rng(7).random((48, 3)).astype(np.float32)
    uninterrupted = kmeans(x, 4, num_iters=4, balanced=True, seed=1)

    def stop_at_iteration_2(iteration, fraction, inertia):
        if iteration == 2:
            raise Interrupt

    with pytest.raises(Interrupt):
        kmeans(x, 4, num_iters=4, balanced=True, seed=1, checkpoint_dir=str(tmp_path), progress=stop_at_iteration_2)
    seen = []
    resumed = kmeans(x, 4, num_iters=4, balanced=True, seed=1, checkpoint_dir=str(tmp_path),
                     progress=lambda it, frac, inertia: seen.append(it))
    assert seen == [2, 3]  # iterations 0 and 1 were saved
    np.testing.assert_array_equal(resumed.centers, uninterrupted.centers)
    np.testing.assert_array_equal(resumed.assignments, uninterrupted.assignments)
