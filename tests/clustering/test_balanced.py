"""balanced_assign (a dense cost) and balanced_assign_points (points and centres searched on the mesh, no [N, M]
array) give exact sizes at the optimum of the linear-assignment problem where each centre is N / M slots
(scipy.optimize.linear_sum_assignment); on 8 fake devices (points over 4, centres over 2) the points' assignment
equals one device's; balanced k-means on skewed data gives equal clusters."""
import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment

import jax

from clus_jax.clustering import balanced_assign, balanced_assign_points, kmeans
from clus_jax.clustering.balanced import squared_distances
from clus_jax.parallel.mesh import create_mesh


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


def points_and_centres(n, m, d, seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype(np.float32)
    return x, (x[rng.choice(n, m, replace=False)] + 0.1 * rng.normal(size=(m, d))).astype(np.float32)


# candidates=2 makes most bids wait for a new list; host_search_rows=0 sends every search to the mesh.
@pytest.mark.parametrize("n,m,d,candidates,host_rows,seed", [
    (60, 4, 3, 2, 256, 0), (120, 12, 5, 3, 0, 1), (200, 20, 8, 2, 256, 2), (200, 20, 8, 2, 0, 3),
    (96, 8, 4, 16, 256, 4), (90, 1, 3, 16, 0, 5), (40, 40, 2, 4, 0, 6)])
def test_points_assignment_has_exact_sizes_at_the_lap_optimum(n, m, d, candidates, host_rows, seed):
    x, c = points_and_centres(n, m, d, seed)
    stats = {}
    ids = balanced_assign_points(x, c, candidates=candidates, host_search_rows=host_rows, stats=stats)
    np.testing.assert_array_equal(np.bincount(ids, minlength=m), np.full(m, n // m))
    cost = squared_distances(x, c)
    optimum = lap_optimum(cost)
    # float32 distances on the device: within a few float32 ulps of the float64 optimum per point.
    assert cost[np.arange(n), ids].sum() <= optimum + 1e-6 * optimum
    if candidates < m:  # the lists were searched again, where the test asked
        assert stats["searched_on_mesh" if host_rows == 0 else "searched_here"] > 0


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_points_assignment_on_8_devices_equals_one_device(metric):
    """Points over data x fsdp (4), centres over tensor (2); lists of 3 of 24 centres, so many searches again on
    the mesh (host_search_rows=0) and on the host. The same ids, and the LAP optimum."""
    mesh = create_mesh({"data": 2, "fsdp": 2, "tensor": 2}, jax.devices()[:8])
    x, c = points_and_centres(480, 24, 6, 7)
    for host_rows in (0, 256):
        one = balanced_assign_points(x, c, metric=metric, candidates=3, host_search_rows=host_rows, block_k=8)
        stats = {}
        eight = balanced_assign_points(x, c, metric=metric, candidates=3, host_search_rows=host_rows, block_k=8,
                                       mesh=mesh, chunk_rows=100, stats=stats)
        np.testing.assert_array_equal(eight, one)
        assert stats["mesh_searches"] > 1 if host_rows == 0 else stats["searched_here"] > 0
    unit = c / np.linalg.norm(c, axis=1, keepdims=True) if metric == "cosine" else c
    cost = squared_distances(x, unit)
    optimum = lap_optimum(cost)
    assert cost[np.arange(len(x)), one].sum() <= optimum + 1e-6 * optimum


def test_rejects_indivisible_sizes():
    with pytest.raises(ValueError, match="N divisible by M; got N=10, M=3"):
        balanced_assign(np.zeros((10, 3)))
    with pytest.raises(ValueError, match="N divisible by M; got N=10, M=3"):
        balanced_assign_points(np.zeros((10, 2), np.float32), np.ones((3, 2), np.float32))


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
