"""Collectives over optional mesh axes and the shard_map island: on 8 devices they equal one device."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from clus_jax.parallel.collectives import (
    all_gather_rows,
    all_max,
    all_min,
    all_sum,
    axis_size,
    batch_spec,
    distributed_logsumexp,
    distributed_softmax,
    global_max,
    global_sum,
    join_axis_names,
    shard_map_island,
    shard_offset,
)

import tolerances  # registered by tests/conftest.py

NAMES = ("data", "fsdp", "tensor")


def mesh(shape):
    return Mesh(np.array(jax.devices()).reshape(shape), NAMES)


def on_shards(fn, m, in_specs, out_specs):
    return jax.jit(jax.shard_map(fn, mesh=m, in_specs=in_specs, out_specs=out_specs))


@pytest.mark.parametrize("names,want", [
    ((None,), None), (((),), None), (([],), None), (("data",), "data"), ((("data",),), "data"),
    ((("data", "fsdp"),), ("data", "fsdp")), (("data", None, ["fsdp"], (), "tensor"), ("data", "fsdp", "tensor")),
    ((), None),
])
def test_join_axis_names(names, want):
    assert join_axis_names(*names) == want


def test_batch_spec():
    assert batch_spec(None) == P(None)
    assert batch_spec(("data",)) == P("data")
    assert batch_spec(["data", "fsdp"], "tensor") == P(("data", "fsdp"), "tensor")
    assert batch_spec((), None) == P(None, None)


def test_unsharded_helpers_are_the_plain_reductions():
    x = jnp.asarray(np.random.default_rng(0).normal(size=(6, 5)), jnp.float32)
    for name in (None, ()):
        assert axis_size(name) == 1
        assert int(shard_offset(7, name)) == 0
        for fn in (all_sum, all_max, all_min, all_gather_rows):
            assert fn(x, name) is x
    # The same XLA reduction as jnp.sum (the same program: bitwise); a maximum is exact in any order.
    np.testing.assert_array_equal(global_sum(x, 0), jnp.sum(x, 0, keepdims=True))
    np.testing.assert_array_equal(global_max(x, (0, 1)), np.max(np.asarray(x), keepdims=True))


@pytest.mark.parametrize("shape,axes", [((8, 1, 1), "data"), ((4, 2, 1), ("data", "fsdp")), ((2, 2, 2), NAMES),
                                        ((2, 1, 4), ["tensor", "data"])])
def test_row_collectives_equal_single_device(shape, axes):
    """Rows split over ``axes``: every helper's result equals the same reduction of the whole array."""
    m = mesh(shape)
    x = np.random.default_rng(1).normal(size=(16, 3)).astype(np.float32)
    rows = batch_spec(axes)
    n = int(np.prod([m.shape[a] for a in ((axes,) if isinstance(axes, str) else axes)]))

    def local(block):
        return {
            "size": jnp.int32(axis_size(axes)),
            "sum": all_sum(jnp.sum(block, 0), axes),
            "max": all_max(jnp.max(block, 0), axes),
            "min": all_min(jnp.min(block, 0), axes),
            "gathered": all_gather_rows(block, axes)[None],  # one copy per shard
            "global_sum": global_sum(block, 0, axes),
            "global_max": global_max(block, (0, 1), axes),
            "lse_rows": distributed_logsumexp(block, 0, axes),
            "softmax_rows": distributed_softmax(block, 0, axes),
        }

    keys = ("size", "sum", "max", "min", "gathered", "global_sum", "global_max", "lse_rows", "softmax_rows")
    got = on_shards(local, m, (rows,), {k: (rows if k in ("softmax_rows", "gathered") else P()) for k in keys})(x)
    assert int(got["size"]) == n
    # Per-shard sums then a sum over shards, against NumPy's float32 order: 16 terms, two orders.
    sum_atol = tolerances.reorder_atol(16, float(np.abs(x).sum(0).max()))
    np.testing.assert_allclose(got["sum"], x.sum(0), rtol=0, atol=sum_atol)
    # Maxima and minima are exact in any order, and gathering only moves values: bitwise.
    np.testing.assert_array_equal(got["max"], x.max(0))
    np.testing.assert_array_equal(got["min"], x.min(0))
    np.testing.assert_array_equal(got["gathered"], np.broadcast_to(x, (n, *x.shape)))
    np.testing.assert_allclose(got["global_sum"], x.sum(0, keepdims=True), rtol=0, atol=sum_atol)
    np.testing.assert_array_equal(got["global_max"], x.max(keepdims=True))
    # float32 log-sum-exp and softmax over 16 entries against float64 (tests/tolerances.py).
    lse = np.log(np.exp(x.astype(np.float64)).sum(0, keepdims=True))
    size = float(max(np.abs(x).max(), np.abs(lse).max()))
    np.testing.assert_allclose(got["lse_rows"], lse, rtol=0, atol=tolerances.lse_rounding(16, size))
    np.testing.assert_allclose(got["softmax_rows"], np.exp(x - lse), rtol=tolerances.log_softmax_atol(16, 0.0, size),
                               atol=tolerances.FLUSHED)

    offsets = on_shards(lambda b: shard_offset(b.shape[0], axes)[None], m, (rows,), rows)(x)
    np.testing.assert_array_equal(offsets, np.arange(n) * (16 // n))


def test_column_logsumexp_and_softmax_sharded_over_two_axes():
    """A reduction over the last axis split over ('fsdp', 'tensor'), with rows split over 'data'."""
    m = mesh((2, 2, 2))
    x = np.random.default_rng(2).normal(size=(4, 12)).astype(np.float32) * 30.0
    x[1, :5] = -np.inf  # partly and (on some shards) entirely -inf slices
    x[3] = -np.inf
    spec = batch_spec("data", ("fsdp", "tensor"))
    cols = ("fsdp", "tensor")
    lse = on_shards(lambda b: distributed_logsumexp(b, -1, cols), m, (spec,), P("data"))(x)
    sm = on_shards(lambda b: distributed_softmax(b, 1, cols), m, (spec,), spec)(x)
    with np.errstate(divide="ignore", invalid="ignore"):
        finite = np.isfinite(x).any(1)
        top = np.where(finite, x.max(1), 0.0)[:, None]
        want = top + np.log(np.exp(x.astype(np.float64) - top).sum(1, keepdims=True))
    # float32 log-sum-exp and softmax over 12 entries up to ~90 in size against float64 (tests/tolerances.py):
    # subtracting the maximum rounds an exponent by up to u * 180, so p's relative error reaches ~2e-5.
    size = float(max(np.abs(x[np.isfinite(x)]).max(), np.abs(want[finite]).max()))
    np.testing.assert_allclose(lse[finite], want[finite], rtol=0, atol=tolerances.lse_rounding(12, size))
    assert np.asarray(lse)[3, 0] == -np.inf
    np.testing.assert_allclose(sm[:3], np.exp(x[:3] - want[:3]), rtol=tolerances.log_softmax_atol(12, 0.0, size),
                               atol=tolerances.FLUSHED)  # exp(-180) underflows float32


def test_distributed_logsumexp_gradient_is_the_softmax():
    m = mesh((2, 2, 2))
    x = np.random.default_rng(3).normal(size=(8, 6)).astype(np.float32)
    spec = batch_spec(("data", "fsdp"), "tensor")
    fn = jax.shard_map(lambda b: distributed_logsumexp(b, 1, "tensor"), mesh=m, in_specs=(spec,),
                       out_specs=P(("data", "fsdp")))
    grad = jax.jit(jax.grad(lambda a: jnp.sum(fn(a))))(x)
    e = np.exp(x.astype(np.float64) - x.max(1, keepdims=True))
    # The gradient is a float32 softmax over 6 entries (exp(x - m) / sum), against float64.
    rtol = tolerances.log_softmax_atol(6, 0.0, float(np.abs(x).max()) + np.log(6))
    np.testing.assert_allclose(grad, e / e.sum(1, keepdims=True), rtol=rtol, atol=tolerances.FLUSHED)


def rows_loss(x, weights, scale, *, axis_name=None):
    """A loss on local rows: scale * global mean of (x @ weights)^2, and the global row count."""
    total = x.shape[0] * axis_size(axis_name)
    value = all_sum(jnp.sum(jnp.square(x @ weights)), axis_name) * scale / total
    return {"loss": value, "rows": jnp.float32(total)}


def rows_loss_bounds(x, weights, scale):
    """(loss atol, gradient atol) of two float32 evaluations of ``rows_loss`` in different summation orders.

    ``y = x @ W``: 5-term dots, each within ``e = gamma(5) |x| @ |W|``. Loss ``scale / B sum y^2`` over 3B terms:
    ``2 |y| e`` per square, and ``gamma(3B + 2)`` of ``sum y^2`` for the sum, the scaling and the division.
    Gradient ``2 scale / B y W^T``, 3-term dots: ``e @ |W|^T`` plus ``gamma(5)`` of ``|y| @ |W|^T`` (the dot and
    two scalings). Twice each, for two orders.
    """
    x, w = np.asarray(x, np.float64), np.asarray(weights, np.float64)
    y, b = x @ w, x.shape[0]
    e = tolerances.gamma(5) * (np.abs(x) @ np.abs(w))
    loss = 2 * scale / b * (np.sum(2 * np.abs(y) * e) + tolerances.gamma(3 * b + 2) * np.sum(y**2))
    grad = 2 * (2 * scale / b) * (e @ np.abs(w).T + tolerances.gamma(5) * (np.abs(y) @ np.abs(w).T))
    return float(loss), float(grad.max())


@pytest.mark.parametrize("shape,axes", [((8, 1, 1), ("data",)), ((4, 2, 1), ("data", "fsdp")), ((2, 2, 2), NAMES)])
def test_island_equals_single_device(shape, axes):
    rng = np.random.default_rng(4)
    x = rng.normal(size=(16, 5)).astype(np.float32)
    weights = rng.normal(size=(5, 3)).astype(np.float32)
    m = mesh(shape)
    specs = (batch_spec(axes), P(), P())

    def run(a):
        return shard_map_island(rows_loss, m, axes, a, weights, jnp.float32(0.5), in_specs=specs)

    single = rows_loss(x, weights, jnp.float32(0.5))
    got = jax.jit(run)(x)
    loss_atol, grad_atol = rows_loss_bounds(x, weights, 0.5)
    np.testing.assert_allclose(got["loss"], single["loss"], rtol=0, atol=loss_atol)
    assert float(got["rows"]) == 16.0
    g_single = jax.grad(lambda a: rows_loss(a, weights, 0.5)["loss"])(x)
    g_island = jax.jit(jax.grad(lambda a: run(a)["loss"]))(x)
    np.testing.assert_allclose(g_island, g_single, rtol=0, atol=grad_atol)
    # A gradient summed instead of averaged over the shards, or one shard's rows dropped, is off by ~|g|.
    assert grad_atol < 0.01 * float(np.max(np.abs(g_single)))


def test_island_default_specs_split_every_argument_by_rows():
    m = mesh((4, 2, 1))
    x = np.arange(32.0, dtype=np.float32).reshape(16, 2)
    seen = []

    def fn(a, b, *, axis_name):
        seen.append((axis_name, a.shape, b.shape))
        return all_sum(jnp.sum(a * b), axis_name)

    got = shard_map_island(fn, m, ("data", "fsdp"), x, x)
    assert float(got) == float(np.sum(x * x))
    assert seen == [(("data", "fsdp"), (2, 2), (2, 2))]


def test_island_with_other_axes_and_keyword():
    """Columns split over 'tensor' as well (as a prototype bank is), the axis name passed as batch_axis_name."""
    m = mesh((2, 2, 2))
    x = np.random.default_rng(5).normal(size=(8, 6)).astype(np.float32)

    def fn(block, *, batch_axis_name):
        return all_sum(jnp.sum(jax.nn.softmax(block) * 0.0 + block), join_axis_names(batch_axis_name, "tensor"))

    for batch in (("data", "fsdp"), None):
        spec = batch_spec(batch, "tensor")
        got = shard_map_island(fn, m, batch, x, in_specs=(spec,), axis_name_arg="batch_axis_name")
        # 48 terms summed per shard and over shards, against NumPy's order.
        atol = tolerances.reorder_atol(48, float(np.abs(x).sum()))
        np.testing.assert_allclose(float(got), x.sum(), rtol=0, atol=atol)


def test_island_without_split_calls_fn_directly():
    m = mesh((1, 1, 8))
    x = jnp.ones((4, 2), jnp.float32)
    seen = []

    def fn(a, *, axis_name):
        seen.append(axis_name)
        assert not isinstance(a, jax.core.Tracer)  # not traced by shard_map
        return jnp.sum(a)

    for batch in (None, ()):
        assert float(shard_map_island(fn, m, batch, x)) == 8.0
        assert float(shard_map_island(fn, m, batch, x, in_specs=(P(),))) == 8.0
    assert seen == [None] * 4


def test_island_checks_the_number_of_specs():
    with pytest.raises(ValueError, match="2 arguments but 1 in_specs"):
        shard_map_island(rows_loss, mesh((8, 1, 1)), "data", jnp.ones((8, 2)), jnp.ones((2, 2)), in_specs=(P("data"),))
