"""assign_topk equals a NumPy argsort of the distances (euclidean, cosine), on one device and on 8 fake
devices with the centres split over 4; assign equals the argmin."""
import numpy as np
import pytest

import jax

from clus_jax.clustering import assign, assign_topk
from clus_jax.parallel.mesh import create_mesh

import tolerances  # registered by tests/conftest.py


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    return rng.normal(size=(203, 8)).astype(np.float32), rng.normal(size=(37, 8)).astype(np.float32)


@pytest.mark.parametrize("mesh_shape", [None, {"data": 2, "fsdp": 1, "tensor": 4}], ids=["one_device", "2x4"])
@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_topk_equals_numpy_argsort(data, mesh_shape, metric):
    x, c = data
    mesh = create_mesh(mesh_shape, jax.devices()[:8]) if mesh_shape else None
    ids, sims = assign_topk(x, c, 5, metric, mesh=mesh, block_k=3, chunk_rows=64)
    xd, cd = x.astype(np.float64), c.astype(np.float64)
    if metric == "cosine":
        expected_sims = xd @ (cd / np.linalg.norm(cd, axis=1, keepdims=True)).T
    else:
        expected_sims = -((xd[:, None] - cd[None]) ** 2).sum(-1)
    order = np.argsort(-expected_sims, axis=1, kind="stable")[:, :5]
    d = x.shape[1]
    xn, cn = np.linalg.norm(xd, axis=1).max(), np.linalg.norm(cd, axis=1).max()
    if metric == "cosine":  # float32 unit centres (relative error gamma(D + 3)), then a D-term dot: of |x|
        atol = (tolerances.gamma(d) + tolerances.gamma(d + 3)) * xn
    else:  # minus the float32 squared distance: 2 x.c - |c|^2, then - |x|^2 (tolerances.sq_distance_atol)
        atol = tolerances.sq_distance_atol(d, xn, cn)
    # The ids hold on any processor: each row's six best are further apart (float64) than twice the error.
    gaps = -np.diff(np.sort(expected_sims, axis=1)[:, ::-1][:, :6], axis=1)
    assert gaps.min() > 2 * atol, (gaps.min(), atol)
    np.testing.assert_array_equal(ids, order)
    np.testing.assert_allclose(sims, np.take_along_axis(expected_sims, order, axis=1), rtol=0, atol=atol)
    np.testing.assert_array_equal(assign(x, c, metric, mesh=mesh, block_k=3, chunk_rows=64), order[:, 0])


def test_l_out_of_range(data):
    x, c = data
    with pytest.raises(ValueError, match=r"l=38 must lie in \[1, 37\]"):
        assign_topk(x, c, 38)


@pytest.mark.parametrize("width", [1, 7, 13, 48, 1024])
def test_row_argmax_equals_numpy_with_ties_to_the_lower_index(width):
    from clus_jax.clustering.blocked import row_argmax

    rng = np.random.default_rng(width)
    s = rng.integers(0, 5, (64, width)).astype(np.float32)  # many ties
    s[:, -1] = np.where(rng.random(64) < 0.2, 9.0, s[:, -1])  # the maximum last in some rows
    best, index = row_argmax(s)
    # Exact: a max of small integers in float32 involves no rounding.
    np.testing.assert_array_equal(index, np.argmax(s, axis=1))
    np.testing.assert_array_equal(best, s.max(axis=1))


def test_offsets_rank_by_distance_plus_price(data):
    """offsets (the balanced auction's prices) rank centres by -|x - c|^2 - offset[c] and are subtracted from the
    similarities: on 8 devices with the centres split over 4, against NumPy; refused with the cosine metric."""
    x, c = data
    offsets = np.random.default_rng(1).uniform(0, 20, len(c)).astype(np.float32)
    mesh = create_mesh({"data": 2, "fsdp": 1, "tensor": 4}, jax.devices()[:8])
    ids, sims = assign_topk(x, c, 4, "euclidean", mesh=mesh, block_k=3, chunk_rows=64, offsets=offsets)
    values = -((x[:, None, :].astype(np.float64) - c[None]) ** 2).sum(-1) - offsets[None, :]
    np.testing.assert_array_equal(ids, np.argsort(-values, axis=1, kind="stable")[:, :4])
    np.testing.assert_allclose(sims, np.take_along_axis(values, ids, axis=1), rtol=1e-5, atol=1e-4)
    assert not np.array_equal(ids[:, 0], assign(x, c))  # the prices moved some points
    with pytest.raises(ValueError, match="offsets must be \\[37\\] with metric 'euclidean'"):
        assign_topk(x, c, 4, "cosine", offsets=offsets)
