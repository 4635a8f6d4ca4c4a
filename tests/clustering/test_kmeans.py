"""kmeans against a float64 NumPy transcription of Lloyd's algorithm (kmeans_reference.lloyd), on one device
and on 8 fake devices with the centres split over 4; streamed shards; empty-cluster splits; tol; init;
checkpoint resume after an interruption at a pass boundary and mid-pass; no [N, K] array when compiled."""
import numpy as np
import pytest

import jax

from clus_jax.clustering import blocked, kmeans
from clus_jax.clustering.kmeans import PointStream, accumulate_fn, initial_centers
from clus_jax.parallel.mesh import create_mesh

import kmeans_reference
import tolerances  # registered by tests/conftest.py


def blobs(n=600, d=6, centres=10, seed=0, spread=0.6):
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(centres, d)) * 3
    return (means[rng.integers(0, centres, n)] + spread * rng.normal(size=(n, d))).astype(np.float32)


@pytest.fixture(scope="module")
def mesh_2x4():
    return create_mesh({"data": 2, "fsdp": 1, "tensor": 4}, jax.devices()[:8])


def centre_atol(x, init, iters, metric):
    """[k, D] bound on |float32 centre - float64 Lloyd centre| per coordinate, given the same assignments.

    A centre is the mean of the n_j points its last iteration assigned to it, summed in float32 in any order
    (chunks, shards): off by ``tolerances.mean_atol(n_j, mean |x|)``; a split multiplies by 1 +- 1/1024 (exact)
    and rounds once more (u |c|). Cosine: ``m / |m|`` moves by at most 2 |dm| / |m|, and the float32
    normalisations (at most two) by ``gamma(D + 3)`` each.
    """
    x = np.asarray(x, np.float64)
    before, _, _ = kmeans_reference.lloyd(x, init, iters - 1, metric)
    last = kmeans_reference.nearest(x, before, metric)  # the clusters the returned centres are the means of
    centres, _, _ = kmeans_reference.lloyd(x, init, iters, metric)
    k, d = centres.shape
    bound = np.zeros((k, d))
    for j in np.unique(last):
        points = x[last == j]
        bound[j] = tolerances.mean_atol(len(points), np.abs(points).mean(0))
        if metric == "cosine":
            bound[j] = 2 * np.linalg.norm(bound[j]) / np.linalg.norm(points.mean(0)) + 2 * tolerances.gamma(d + 3)
    bound[~np.isin(np.arange(k), last)] = bound.max(0)  # an empty centre is another's, split
    return bound + tolerances.U32 * np.abs(centres)


def check_against_lloyd(result, x, init, iters, metric="euclidean"):
    centres, assignments, sizes = kmeans_reference.lloyd(x, init, iters, metric)
    atol = centre_atol(x, init, iters, metric)
    np.testing.assert_allclose((result.centers - centres) / atol, 0, rtol=0, atol=1)  # in units of the bound
    # A misplaced point or a wrong count moves a centre by about |x - c| / n_j, far more than the rounding.
    assert atol.max() < 1e-3
    np.testing.assert_array_equal(result.assignments, assignments)
    np.testing.assert_array_equal(result.sizes, sizes)
    if metric == "euclidean":
        want = ((x - centres[assignments]) ** 2).sum(1).mean()
        # float32 |x|^2 - 2 x.c + |c|^2 per point (sq_distance_atol), summed in float32 over at most N points,
        # and the centres' own error (above): |d|x - c|^2| <= 2 |x - c| |dc| + |dc|^2.
        xn, cn = np.linalg.norm(x, axis=1), np.linalg.norm(centres[assignments], axis=1)
        dc = np.linalg.norm(atol, axis=1)[assignments]
        dist = np.sqrt(((x - centres[assignments]) ** 2).sum(1))
        bound = (np.mean(tolerances.sq_distance_atol(x.shape[1], xn, cn) + 2 * dist * dc + dc ** 2)
                 + tolerances.gamma(len(x)) * want)
        assert abs(result.inertia - want) <= bound, (result.inertia, want, bound)
        assert bound < want / len(x)  # below one point's share: a point counted twice or a padded row adds more
    assert result.num_iters_run == iters


def test_matches_lloyd_on_one_device():
    x = blobs()
    init = x[np.random.default_rng(1).choice(len(x), 13, replace=False)]
    # 13 centres in blocks of 4 (padded to 16), 600 points in chunks of 256 (the last one padded).
    result = kmeans(x, 13, num_iters=6, init=init, block_k=4, chunk_rows=256)
    check_against_lloyd(result, x, init, 6)


def test_matches_lloyd_on_8_devices_centres_over_4(mesh_2x4):
    x = blobs(seed=3)
    init = x[np.random.default_rng(2).choice(len(x), 13, replace=False)]
    # 4 centre shards of 4 (13 real + 3 padding), blocks of 2; 2 data shards of 128 rows per chunk.
    result = kmeans(x, 13, num_iters=6, init=init, mesh=mesh_2x4, block_k=2, chunk_rows=256)
    check_against_lloyd(result, x, init, 6)


def test_cosine_is_spherical_lloyd(mesh_2x4):
    x = blobs(seed=4)
    init = x[:9]
    result = kmeans(x, 9, num_iters=5, metric="cosine", init=init, mesh=mesh_2x4, block_k=2, chunk_rows=256)
    check_against_lloyd(result, x, init, 5, metric="cosine")
    # float32 unit centres measured with a float32 norm (tolerances.unit_norm_atol)
    np.testing.assert_allclose(np.linalg.norm(result.centers, axis=1), 1.0, rtol=0,
                               atol=tolerances.unit_norm_atol(x.shape[1]))


def test_empty_clusters_are_split_from_the_largest():
    x = blobs(n=400, seed=5)
    # Centres 3 and 4 duplicate centre 0 (they lose every tie: empty) and centre 5 is far from every point.
    init = np.concatenate([x[:3], x[:1], x[:1], np.full((1, x.shape[1]), 1e3, np.float32), x[3:6]])
    for iters in (1, 4):  # the split centres themselves, and what Lloyd makes of them
        result = kmeans(x, 9, num_iters=iters, init=init, block_k=4, chunk_rows=128)
        check_against_lloyd(result, x, init, iters)
    assert (result.sizes > 0).all()


def test_streamed_shards_equal_the_array():
    x = blobs(seed=6)
    init = x[:8]
    shards = [x[:37], x[37:300], x[300:301], x[301:]]  # uneven, not aligned with the chunks
    streamed = kmeans(shards, 8, num_iters=4, init=init, chunk_rows=128)
    whole = kmeans(x, 8, num_iters=4, init=init, chunk_rows=128)
    # Bitwise: the shards are re-cut into the same chunks, so the same program sums the same rows in order.
    np.testing.assert_array_equal(streamed.centers, whole.centers)
    np.testing.assert_array_equal(streamed.assignments, whole.assignments)
    with pytest.raises(TypeError, match="re-iterable"):
        kmeans(iter(shards), 8)


def test_tol_stops_when_inertia_stops_falling():
    x = blobs(seed=7)
    result = kmeans(x, 10, num_iters=50, init=x[:10], tol=1e-6)
    assert 1 < result.num_iters_run < 50
    centres, assignments, _ = kmeans_reference.lloyd(x, x[:10], result.num_iters_run)
    atol = centre_atol(x, x[:10], result.num_iters_run, "euclidean")  # float32 means of the same clusters
    np.testing.assert_allclose((result.centers - centres) / atol, 0, rtol=0, atol=1)


@pytest.mark.slow
def test_random_and_kmeanspp_init():
    x = blobs(n=500, centres=5, spread=0.05, seed=8)
    a = initial_centers(PointStream(x), 5, "random", "euclidean", seed=3)
    b = initial_centers(PointStream(x), 5, "random", "euclidean", seed=3)
    np.testing.assert_array_equal(a, b)  # seeded
    assert len({tuple(r) for r in a}) == 5 and all((x == r).all(1).any() for r in a)  # distinct points
    # k-means++ on 5 tight, far-apart blobs takes one centre from each (a miss has probability ~1e-4).
    pp = initial_centers(PointStream(x), 5, "kmeans++", "euclidean", seed=0)
    blob_of = kmeans_reference.nearest(pp, blobs_means(x, 5), "euclidean")
    assert sorted(blob_of) == [0, 1, 2, 3, 4]
    result = kmeans(x, 5, num_iters=3, init="kmeans++")
    assert result.inertia < 0.05 ** 2 * x.shape[1] * 1.5


def blobs_means(x, centres):
    # The blob means of blobs(n, centres, seed=8): the same generator draws them first.
    rng = np.random.default_rng(8)
    return rng.normal(size=(centres, x.shape[1])) * 3


class Interrupt(Exception):
    pass


def interrupt_at(iteration, fraction):
    def progress(it, frac, inertia):
        assert np.isfinite(inertia)
        if (it, round(frac, 6)) == (iteration, round(fraction, 6)):
            raise Interrupt
    return progress


@pytest.mark.slow
@pytest.mark.parametrize("where", [(3, 0.25), (3, 0.5)], ids=["after_3_iterations", "mid_pass"])
def test_interrupted_run_resumes_to_the_same_centres(tmp_path, mesh_2x4, where):
    # Unclustered points and an interruption in the last iteration, so a lost partial sum or centre cannot
    # be washed out by later iterations converging to the same optimum.
    x = np.random.default_rng(9).random((512, 6)).astype(np.float32)
    kwargs = dict(num_iters=4, init="random", seed=4, mesh=mesh_2x4, chunk_rows=128, block_k=2)
    uninterrupted = kmeans(x, 7, **kwargs)
    with pytest.raises(Interrupt):
        kmeans(x, 7, checkpoint_dir=str(tmp_path), checkpoint_every_s=0.0, progress=interrupt_at(*where), **kwargs)
    seen = []
    resumed = kmeans(x, 7, checkpoint_dir=str(tmp_path), checkpoint_every_s=0.0,
                     progress=lambda it, frac, inertia: seen.append((it, frac)), **kwargs)
    # The chunk that was interrupted is the first one done again: the run restarts from the save after
    # the 3 finished iterations, or from the save after the first chunk of the last pass.
    assert seen[0] == where
    # Bitwise: the resumed run sums the same chunks in the same order with the same program.
    np.testing.assert_array_equal(resumed.centers, uninterrupted.centers)
    np.testing.assert_array_equal(resumed.assignments, uninterrupted.assignments)
    with pytest.raises(ValueError, match="different clustering"):
        kmeans(x, 6, checkpoint_dir=str(tmp_path), **kwargs)


def test_config_errors():
    x = blobs(n=50)
    with pytest.raises(ValueError, match="metric='l1'"):
        kmeans(x, 3, metric="l1")
    with pytest.raises(ValueError, match=r"init centres have shape \(2, 6\)"):
        kmeans(x, 3, init=x[:2])
    with pytest.raises(ValueError, match="k=51 exceeds"):
        kmeans(x, 51)
    with pytest.raises(ValueError, match="init='best'"):
        kmeans(x, 3, init="best")


def test_no_n_by_k_array_in_the_compiled_step():
    # One chunk of 8192 points against 16384 centres: an [N, K] float32 array would be 512 MiB.
    n, k, d, budget = 8192, 16384, 16, 64 << 20
    assert n * k * 4 >= 8 * budget
    layout = blocked.make_layout(None, k, block_k=512)
    step = accumulate_fn(layout, "euclidean")
    f32 = jax.ShapeDtypeStruct
    compiled = step.lower(f32((n, d), np.float32), f32((n,), np.bool_), f32((layout.padded_k, d), np.float32),
                          f32((layout.padded_k,), np.float32), f32((1, layout.padded_k, d), np.float32),
                          f32((1, layout.padded_k), np.int32)).compile()
    memory = compiled.memory_analysis()
    assert memory.temp_size_in_bytes < budget, memory
    hlo = compiled.as_text()
    assert f"[{n},{k}]" not in hlo and f"[{n},{layout.padded_k}]" not in hlo
    assert f"[{n},512]" in hlo  # the block of scores is what is formed instead
