"""The 'mlcd' objective (MLCD, with UNICOM's margin softmax): margin_softmax_loss and mlcd_loss against the
float64 NumPy transcriptions of unicom's PartialFC_V2 / CombinedMarginLoss and of the paper's Eq. 5
(``unicom_reference``: loss and hand-derived gradients), Partial-FC sampling, the objective sharded over 8 and
4 devices equal to one device with the same sampled centres (loss and gradients), the compiled logits'
shapes, config errors, and a real train step (image tower only, the centres' learning-rate multiplier, the
k-means initialisation)."""
import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from clus_jax.train.experiment import build
from clus_jax.objectives import mlcd, partial_fc, registry
from clus_jax.objectives.mlcd_math import margin_softmax_loss, mlcd_loss
from clus_jax.objectives.partial_fc import sample_negatives, sampled_classes
from clus_jax.objectives.registry import ConfigError, LossContext
from clus_jax.parallel import mesh as mesh_lib
from clus_jax.parallel import partitioning
import tolerances  # registered by tests/conftest.py
import train_helpers as helpers  # registered by tests/conftest.py
from train_helpers import recording  # noqa: F401  (fixture)
import unicom_reference as ref  # registered by tests/conftest.py

# Float64 against the float64 oracle: the bounds below with u = 2^-53 are far below RTOL64. Float32 against it:
# the bounds below, derived per case (cosine_loss_bounds).
RTOL64 = 1e-9
U = tolerances.U32
PRECISIONS = [np.float64, np.float32]
MLCD = registry.get("mlcd")


@pytest.fixture(params=PRECISIONS, ids=["float64", "float32"])
def precision(request):
    dtype = request.param
    with jax.enable_x64(dtype == np.float64):
        yield dtype


def assert_close(got, want, rtol, err_msg=""):
    """Relative to the largest entry (gradient entries may cancel to nearly zero)."""
    want = np.asarray(want, np.float64)
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=rtol, atol=rtol * float(np.abs(want).max()),
                               err_msg=err_msg)


def assert_matches(got, want, dtype, float32_atol, err_msg=""):
    """float64: RTOL64 of the largest entry; float32: the derived bound of one evaluation (rtol 0)."""
    if dtype == np.float64:
        assert_close(got, want, RTOL64, err_msg)
    else:
        np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=0, atol=float32_atol, err_msg=err_msg)


def with_cosine_weights(oracle, *args):
    """(the oracle's result, its dL/dcos [B, C]): the weights its gradients pass through the cosines."""
    captured, through = {}, ref._through_cosines

    def capture(e, w, g_cos):
        captured["g_cos"] = g_cos
        return through(e, w, g_cos)

    ref._through_cosines = capture
    try:
        result = oracle(*args)
    finally:
        ref._through_cosines = through
    return result, captured["g_cos"]


def cosine_loss_bounds(e, w, labels, scale, loss, g_cos, margin=0.0, cos_margin=0.0, terms_per_row=1):
    """(loss atol, dL/de atol, dL/dw atol) of one float32 evaluation of a loss over logits ``s cos(e_b, w_c)`` of
    raw rows (unicom's margin softmax, one term per row, ``labels`` [B]; MLCD's Eq. 5, two, ``labels`` [B, l])
    against the float64 oracle on the same float32 inputs, whose dL/dcos is ``g_cos``.

    Both sides are normalised in float32 (unit_rows_relative_error(D) each), so a cosine errs by gamma(D) plus
    twice that. ArcFace's ``cos(arccos c + m)`` moves by at most arccos's change, ``dc / sin(theta)`` or, near
    c = +-1, ``1.6 sqrt(dc)``, and rounds ~25u more (arccos, + m, cos, the straight-through pair); CosFace's
    ``c - m`` rounds once. Each term (a softmax over C, or log(1 + sum exp) over at most C) errs by
    log_softmax_atol; the B-row mean adds gamma(B) of the loss. Gradient: the weights dL/dcos are probabilities
    times s / B (minus the one-hot target for the softmax, whose p errs all the same: 2 s / B more there), off
    by their relative error; through the D-term sums and each normalisation's backward ``(g - x (x . g)) / |x|``
    as in test_moco.py: that error twice, plus the dot's gamma and the rows' error, per row over its |x|.
    """
    (batch, dim), classes = np.shape(e), len(w)
    ure, g = tolerances.unit_rows_relative_error(dim), tolerances.gamma
    cos_err = g(dim) + 2 * ure
    margin_err = 0.0
    labels = np.asarray(labels).reshape(batch, -1)
    if margin:
        cos, _ = ref.cosines(e, w)
        c = np.abs(np.take_along_axis(cos, np.maximum(labels, 0), axis=1)[labels >= 0])
        sine = np.sqrt(np.maximum(1 - np.minimum(c + cos_err, 1.0) ** 2, 0.0))
        d_theta = np.minimum(cos_err / np.maximum(sine, 1e-300), 1.6 * np.sqrt(cos_err))
        margin_err = float(d_theta.max()) + 25 * U
    logit_atol = scale * (cos_err + max(margin_err, 2 * U if cos_margin else 0.0) + U)
    p_err = tolerances.log_softmax_atol(classes + 1, logit_atol, scale)
    loss_atol = terms_per_row * p_err + (g(batch) + g(terms_per_row) + 2 * U) * loss
    weights = np.abs(g_cos)
    if terms_per_row == 1:  # softmax - onehot
        weights[np.arange(batch), labels[:, 0]] += 2 * scale / batch

    def through(rows, weight_sums, n):  # the gradient of raw ``rows``, whose unit rows' weights add up to weight_sums
        err = weight_sums * (p_err + 2 * g(n) + 3 * U + 2 * ure)
        return float(np.max((2 * err + (g(dim) + 2 * ure + 6 * U) * weight_sums) / np.linalg.norm(rows, axis=1)))

    return loss_atol, through(e, weights.sum(axis=1), classes), through(w, weights.sum(axis=0), batch)


def near_centres(rng, batch, dim, num_classes, labels, spread=0.6):
    """Raw (not unit) embeddings near their labelled centres, and raw centres of varying norms."""
    centres = rng.normal(size=(num_classes, dim)) * rng.uniform(0.5, 2.0, (num_classes, 1))
    labels = np.asarray(labels).reshape(batch, -1)
    safe = np.where(labels >= 0, labels, 0)
    base = ref.normalize(centres)[safe].sum(axis=1)
    embeddings = (base + spread * rng.normal(size=(batch, dim))) * rng.uniform(0.5, 3.0, (batch, 1))
    return embeddings, centres


def distinct_labels(rng, batch, num_labels, num_classes, pad=0):
    """[B, l] distinct class ids per row, the last ``pad`` entries of every other row set to -1."""
    labels = np.stack([rng.permutation(num_classes)[:num_labels] for _ in range(batch)]).astype(np.int32)
    if pad:
        labels[::2, num_labels - pad:] = -1
    return labels


# ----------------------------------------------------------------------------------------------------
# margin_softmax_loss: unicom's PartialFC_V2(CombinedMarginLoss(s, 1, m2, m3)), forward and backward.
# ----------------------------------------------------------------------------------------------------

# (scale, arc_margin, cos_margin): ArcFace s 32 with m 0.3 and 0.5, ArcFace s 64, CosFace s 64 m 0.4.
UNICOM_CASES = [(32.0, 0.3, 0.0), (32.0, 0.5, 0.0), (64.0, 0.5, 0.0), (64.0, 0.0, 0.4)]


def unicom_case(case):
    scale, arc, cos_m = case
    rng = np.random.default_rng(int(scale + 10 * arc + 100 * cos_m))
    b, d, c = 12, 16, 20
    labels = rng.integers(0, c, b)
    e, w = near_centres(rng, b, d, c, labels)
    return e, w, labels


@functools.lru_cache(maxsize=None)
def unicom_results(dtype):
    """Every case's (loss, (dL/de, dL/dw)) from one compiled program (one compile per precision)."""
    inputs = [tuple(np.asarray(x, dtype if i < 2 else np.int32) for i, x in enumerate(unicom_case(c)))
              for c in UNICOM_CASES]

    def all_cases(inputs):
        return [jax.value_and_grad(lambda e, w, y=y, c=c: margin_softmax_loss(
            e, y, w, scale=c[0], arc_margin=c[1], cos_margin=c[2]), (0, 1))(e, w)
            for (e, w, y), c in zip(inputs, UNICOM_CASES)]

    return jax.device_get(jax.jit(all_cases)(inputs)), inputs


@pytest.mark.parametrize("case", range(len(UNICOM_CASES)),
                         ids=["arc_s32_m03", "arc_s32_m05", "arc_s64_m05", "cos_s64_m04"])
def test_margin_softmax_matches_unicom(case, precision):
    dtype = precision
    results, inputs = unicom_results(dtype)
    (loss, (g_e, g_w)), (e, w, labels) = results[case], inputs[case]
    assert loss.dtype == dtype
    scale, arc, cos_m = UNICOM_CASES[case]
    (want, want_e, want_w), g_cos = with_cosine_weights(ref.margin_softmax_numpy, e, labels, w, scale, arc, cos_m)
    loss_atol, e_atol, w_atol = cosine_loss_bounds(e, w, labels, scale, want, g_cos, arc, cos_m)
    assert_matches(float(loss), want, dtype, loss_atol)
    assert_matches(g_e, want_e, dtype, e_atol)
    assert_matches(g_w, want_w, dtype, w_atol)
    # A wrong margin or scale, or a dropped normalisation backward, moves the gradients by a good part of them.
    assert e_atol < 0.05 * np.abs(want_e).max() and w_atol < 0.05 * np.abs(want_w).max() and loss_atol < 0.01 * want


def test_margin_is_straight_through_and_the_floor_keeps_unicom_gradient():
    """A row whose target probability is below 1e-30 adds -log(1e-30) to the loss and still the
    ``softmax - onehot`` gradient; the gradient is the plain cosine's, not that of cos(arccos(c) + m)."""
    with jax.enable_x64(True):
        rng = np.random.default_rng(3)
        d, c = 8, 6
        w = rng.normal(size=(c, d))
        w_hat = ref.normalize(w)
        e = np.stack([-w_hat[0] + 0.05 * rng.normal(size=d), w_hat[2] + 0.3 * rng.normal(size=d)])
        labels = np.array([0, 2])  # row 0 points away from its class: p_target ~ e^-120 at s 64
        loss, (g_e, g_w) = jax.jit(jax.value_and_grad(
            lambda e, w: margin_softmax_loss(e, jnp.asarray(labels), w, scale=64.0, arc_margin=0.5), (0, 1)))(e, w)
        want, want_e, want_w = ref.margin_softmax_numpy(e, labels, w, 64.0, 0.5)
        cos, _ = ref.cosines(e, w)
        assert 64 * (np.cos(np.arccos(cos[0, 0]) + 0.5) - cos[0].max()) < math.log(1e-30)
        assert want > -math.log(1e-30) / 2  # the floored row dominates the mean
        np.testing.assert_allclose(float(loss), want, rtol=RTOL64)
        assert_close(g_e, want_e, RTOL64)
        assert_close(g_w, want_w, RTOL64)
        assert np.abs(np.asarray(g_e[0])).max() > 1e-3  # the floored row still has a gradient


def test_margin_softmax_rejects_both_margins():
    with pytest.raises(ValueError, match="not both"):
        margin_softmax_loss(jnp.ones((2, 4)), jnp.zeros(2, jnp.int32), jnp.ones((3, 4)), arc_margin=0.3, cos_margin=0.2)


def fake_mesh(shape, names):
    return jax.make_mesh(shape, names, axis_types=(jax.sharding.AxisType.Auto,) * len(shape),
                         devices=jax.devices()[: int(np.prod(shape))])


def test_sharded_pure_losses_equal_unsharded():
    """Centres split over 8 devices inside shard_map (embeddings whole): the same losses and gradients."""
    mesh = fake_mesh((8,), ("classes",))
    with jax.enable_x64(True):
        rng = np.random.default_rng(4)
        b, d, c = 8, 12, 32
        labels = distinct_labels(rng, b, 3, c, pad=1)
        e, w = near_centres(rng, b, d, c, labels)
        mask = rng.random((b, c)) < 0.5

        def sharded(fn, *args, specs):
            return jax.shard_map(fn, mesh=mesh, in_specs=specs, out_specs=P())(*args)

        unicom = lambda e, w: sharded(lambda e, w: margin_softmax_loss(  # noqa: E731
            e, jnp.asarray(labels[:, 0]), w, scale=64.0, arc_margin=0.5, axis_name="classes"), e, w,
            specs=(P(), P("classes")))
        multi = lambda e, w: sharded(lambda e, w, m: mlcd_loss(  # noqa: E731
            e, jnp.asarray(labels), w, scale=64.0, negative_mask=m, axis_name="classes"), e, w, jnp.asarray(mask),
            specs=(P(), P("classes"), P(None, "classes")))
        for fn, oracle in ((unicom, ref.margin_softmax_numpy(e, labels[:, 0], w, 64.0, 0.5)),
                           (multi, ref.mlcd_numpy(e, labels, w, 64.0, 0.3, mask))):
            loss, grads = jax.jit(jax.value_and_grad(fn, (0, 1)))(e, w)
            np.testing.assert_allclose(float(loss), oracle[0], rtol=RTOL64)
            for g, want in zip(grads, oracle[1:]):
                assert_close(g, want, RTOL64)


# ----------------------------------------------------------------------------------------------------
# mlcd_loss: Eq. 5 with margin and scale, -1 padding, a negative mask, the vanilla l = 1 form.
# ----------------------------------------------------------------------------------------------------

MLCD_CASES = [(32.0, 0.3, 0, False), (64.0, 0.3, 2, True), (64.0, 0.5, 1, False), (16.0, 0.0, 3, True)]


def mlcd_case(case):
    scale, margin, pad, masked = case
    rng = np.random.default_rng(int(scale) + pad)
    b, d, k, l = 10, 16, 24, 4
    labels = distinct_labels(rng, b, l, k, pad=pad)
    labels[1] = -1  # a row without positives: only the negative term
    e, w = near_centres(rng, b, d, k, labels)
    mask = rng.random((b, k)) < 0.4 if masked else np.ones((b, k), bool)
    return e, w, labels, mask


@functools.lru_cache(maxsize=None)
def mlcd_results(dtype):
    """Every case's (loss, (dL/de, dL/dw)), unmasked cases without a mask, from one compiled program."""
    inputs = [tuple(np.asarray(x, dtype) if i < 2 else x for i, x in enumerate(mlcd_case(c))) for c in MLCD_CASES]

    def all_cases(inputs):
        return [jax.value_and_grad(lambda e, w, y=y, m=m, c=c: mlcd_loss(
            e, y, w, scale=c[0], margin=c[1], negative_mask=m if c[3] else None), (0, 1))(e, w)
            for (e, w, y, m), c in zip(inputs, MLCD_CASES)]

    return jax.device_get(jax.jit(all_cases)(inputs)), inputs


@pytest.mark.parametrize("case", range(len(MLCD_CASES)), ids=["s32", "s64_pad_mask", "s64_m05_pad", "s16_m0_mask"])
def test_mlcd_loss_matches_eq5(case, precision):
    dtype = precision
    scale, margin, _, masked = MLCD_CASES[case]
    results, inputs = mlcd_results(dtype)
    (loss, (g_e, g_w)), (e, w, labels, mask) = results[case], inputs[case]
    assert loss.dtype == dtype
    (want, want_e, want_w), g_cos = with_cosine_weights(ref.mlcd_numpy, e, labels, w, scale, margin,
                                                        mask if masked else None)
    loss_atol, e_atol, w_atol = cosine_loss_bounds(e, w, labels, scale, want, g_cos, margin, terms_per_row=2)
    assert_matches(float(loss), want, dtype, loss_atol)
    assert_matches(g_e, want_e, dtype, e_atol)
    assert_matches(g_w, want_w, dtype, w_atol)
    assert e_atol < 0.05 * np.abs(want_e).max() and w_atol < 0.05 * np.abs(want_w).max() and loss_atol < 0.01 * want
    assert np.all(np.isfinite(g_e)) and np.all(np.isfinite(g_w))


def test_mlcd_loss_with_one_label_and_all_negatives_is_the_vanilla_formula():
    """l = 1, N = all other centres: log(1 + e^{-s_y}) + log(1 + sum_{j != y} e^{s_j}), written out per row."""
    with jax.enable_x64(True):
        rng = np.random.default_rng(5)
        b, d, k, s, m = 6, 8, 9, 32.0, 0.3
        labels = rng.integers(0, k, (b, 1))
        e, w = near_centres(rng, b, d, k, labels)
        total = 0.0
        for i in range(b):
            cos = [float(np.dot(e[i], w[j]) / np.linalg.norm(e[i]) / np.linalg.norm(w[j])) for j in range(k)]
            y = int(labels[i, 0])
            s_y = s * math.cos(math.acos(cos[y]) + m)
            total += math.log(1 + math.exp(-s_y)) + math.log(1 + sum(math.exp(s * cos[j]) for j in range(k) if j != y))
        got = jax.jit(lambda e, w: mlcd_loss(e, jnp.asarray(labels), w, scale=s, margin=m))(e, w)
        np.testing.assert_allclose(float(got), total / b, rtol=1e-12)


def test_mlcd_loss_is_stable_at_scale_64():
    """Cosines near +-1 at s 64 (e^64 overflows float32 sums of a few thousand): finite and equal to float64."""
    rng = np.random.default_rng(6)
    b, d, k = 4, 8, 3000
    w = rng.normal(size=(k, d))
    labels = np.array([[0], [1], [2], [3]])
    e = -ref.normalize(w[:4]) + 1e-3 * rng.normal(size=(b, d))  # positives at cos ~ -1, some negatives near +1
    e[1] = ref.normalize(w[1])  # a positive at cos 1
    loss, g = jax.jit(jax.value_and_grad(lambda e: mlcd_loss(e, jnp.asarray(labels), jnp.asarray(w, jnp.float32),
                                                             scale=64.0)))(jnp.asarray(e, jnp.float32))
    (want, want_e, _), g_cos = with_cosine_weights(ref.mlcd_numpy, np.float32(e), labels, np.float32(w), 64.0, 0.3)
    assert want > 100 and np.isfinite(float(loss))
    # The margin at cos ~ -1 is ill-conditioned (arccos's slope ~ 1 / sin(theta)): the bound is loose there.
    loss_atol, e_atol, _ = cosine_loss_bounds(np.float32(e), np.float32(w), labels, 64.0, want, g_cos, 0.3, 0.0, 2)
    np.testing.assert_allclose(float(loss), want, rtol=0, atol=loss_atol)
    np.testing.assert_allclose(np.asarray(g), want_e, rtol=0, atol=e_atol)


def test_a_zero_centre_out_of_the_loss_gets_a_zero_gradient():
    """A zero row of ``centers`` masked out of the negatives (as Partial FC's zero padding rows): finite
    gradients, exactly zero on that row (the norm's gradient at 0 is torch's 0, not NaN)."""
    rng = np.random.default_rng(8)
    labels = distinct_labels(rng, 6, 2, 8)
    e, w = near_centres(rng, 6, 8, 8, labels)
    w[3] = 0.0
    labels[labels == 3] = -1
    mask = np.arange(8) != 3
    g_e, g_w = jax.jit(jax.grad(lambda e, w: mlcd_loss(e, jnp.asarray(labels), w, negative_mask=jnp.asarray(mask)),
                                (0, 1)))(np.float32(e), np.float32(w))
    assert np.all(np.isfinite(g_e)) and np.all(np.isfinite(g_w)) and np.any(g_w)
    assert not np.any(np.asarray(g_w)[3])


# ----------------------------------------------------------------------------------------------------
# Partial-FC sampling.
# ----------------------------------------------------------------------------------------------------


def test_sample_negatives_keeps_every_positive_and_fills_at_random():
    labels = jnp.asarray([[3, 17, -1], [17, 40, 63], [64, -5, 3]], jnp.int32)  # 64 and -5: not this shard's
    draw = jax.jit(jax.vmap(lambda key: sample_negatives(key, labels, 64, 10)))
    draws = list(np.asarray(draw(jax.random.split(jax.random.key(0), 40))))
    for index in draws:
        assert index.shape == (10,) and index.dtype == np.int32
        assert np.all(np.diff(index) > 0) and index.min() >= 0 and index.max() < 64  # sorted, distinct
        assert {3, 17, 40, 63} <= set(index.tolist())
    others = np.concatenate([np.setdiff1d(i, [3, 17, 40, 63]) for i in draws])
    assert len(np.unique(others)) > 40  # random fill, not the same negatives every step
    # More distinct positives than slots: the slots hold positives only.
    many = jax.jit(lambda key: sample_negatives(key, jnp.arange(12, dtype=jnp.int32), 64, 5))(jax.random.key(0))
    assert set(np.asarray(many).tolist()) <= set(range(12))
    with pytest.raises(ValueError, match="num_sample"):
        sample_negatives(jax.random.key(0), labels, 64, 65)


# ----------------------------------------------------------------------------------------------------
# The objective on given embeddings (no towers): a LossContext built by hand, run under jit on a mesh.
# ----------------------------------------------------------------------------------------------------

K, L, B, D, RATE = 512, 3, 24, 12, 0.25  # 8 shards of 64 centres sample 16 each: the ~9 positives a shard owns fit
SCALE, MARGIN = 48.0, 0.4


def mlcd_config(**overrides):
    settings = {"mlcd.num_classes": K, "mlcd.num_labels": L, "mlcd.sample_rate": RATE, "mlcd.scale": SCALE,
                "mlcd.margin": MARGIN, "model.embed_dim": D, "model.image.depth": 1, "model.text.depth": 1,
                "model.text.vocab_size": 1024, "batch_size": B}
    return helpers.tiny_config("mlcd", **{**settings, **overrides})


def objective_fn(config, mesh_shape):
    """jit(value_and_grad) of the objective's loss w.r.t. (image_emb, centres) on a mesh, and the mesh."""
    mesh = mesh_lib.create_mesh(mesh_shape, jax.devices()[: int(np.prod(list(mesh_shape.values())))])
    rules = [tuple(r) for r in config.logical_axis_rules]
    batch_axes = partitioning.batch_axes(mesh, rules)

    def loss(image_emb, centers, labels, rng):
        ctx = LossContext(outputs={"image_emb": image_emb}, params={"mlcd": {"centers": centers}}, state={},
                          step=jnp.int32(0), rng=rng, batch={"cluster_labels": labels}, apply_model=None, mesh=mesh,
                          batch_axes=batch_axes, config=config)
        value, metrics, _ = MLCD.loss(ctx)
        return value, metrics

    return jax.jit(jax.value_and_grad(loss, (0, 1), has_aux=True)), mesh


@functools.lru_cache(maxsize=None)
def objective_on(mesh_items, num_classes=K):
    return objective_fn(mlcd_config(**{"mlcd.num_classes": num_classes, "mlcd.pad_classes_to": 128}), dict(mesh_items))


def objective_inputs(seed=0, num_classes=K):
    """Unit embeddings, K-row (raw, small) centres followed by padding rows up to K rows, labels < num_classes."""
    rng = np.random.default_rng(seed)
    labels = distinct_labels(rng, B, L, num_classes, pad=1)
    e, w = near_centres(rng, B, D, K, labels)
    return ref.normalize(e).astype(np.float32), (0.01 * w).astype(np.float32), labels


one_device_mlcd = jax.jit(jax.value_and_grad(
    lambda e, w, labels, mask: mlcd_loss(e, labels, w, scale=SCALE, margin=MARGIN, negative_mask=mask), (0, 1)))
sampled_classes_jit = jax.jit(sampled_classes, static_argnums=(2, 3, 4, 5))

# (mesh, K, the centres' mesh axes, number of centre shards): one device; centres over all 8; over 4 with
# data = 2, where K = 500 is padded to 512 rows (128 per shard; the last 12 never sampled or scored).
OBJECTIVE_MESHES = [(dict(data=1, fsdp=1, tensor=1), K, None, 1), (dict(data=8, fsdp=1, tensor=1), K, "data", 8),
                    (dict(data=2, fsdp=1, tensor=2), 500, ("data", "tensor"), 4)]


@pytest.mark.parametrize("mesh_shape,k,axes,shards", OBJECTIVE_MESHES, ids=["one", "data8", "data2_tensor2_padded"])
def test_sharded_objective_equals_one_device_with_the_same_sampled_centres(mesh_shape, k, axes, shards):
    e, w, labels = objective_inputs(num_classes=k)
    rng = jax.random.PRNGKey(7)
    fn, mesh = objective_on(tuple(mesh_shape.items()), k)
    assert partial_fc.padded_rows(k, 128) == K
    assert partial_fc.class_axes(K, mlcd_config(), mesh) == axes
    (loss, metrics), (g_e, g_w) = fn(e, w, labels, rng)

    sampled = np.asarray(sampled_classes_jit(rng, jnp.asarray(labels), k, shards, RATE, K))
    assert len(sampled) == shards * int(RATE * K / shards) and len(np.unique(sampled)) == len(sampled)
    assert sampled.max() < k  # no padding row is drawn
    assert set(labels[labels >= 0].tolist()) <= set(sampled.tolist())  # every positive of the batch was kept
    assert not np.any(np.asarray(g_w)[k:])  # padding rows: no gradient
    w, g_w = w[:k], np.asarray(g_w)[:k]
    mask = np.zeros(k, bool)
    mask[sampled] = True
    # One device, the same sampled centres: mlcd_loss with those as the negative mask ...
    one_loss, (one_e, one_w) = one_device_mlcd(e, w, labels, mask)
    (want, want_e, want_w), g_cos = with_cosine_weights(ref.mlcd_numpy, e, labels, w, SCALE, MARGIN, mask)
    # Sharded sums run in another order: two float32 evaluations, each within the bounds of the exact values.
    loss_atol, e_atol, w_atol = cosine_loss_bounds(e, w, labels, SCALE, want, g_cos, MARGIN, terms_per_row=2)
    np.testing.assert_allclose(float(loss), float(one_loss), rtol=0, atol=2 * loss_atol)
    np.testing.assert_allclose(np.asarray(g_e), one_e, rtol=0, atol=2 * e_atol)
    np.testing.assert_allclose(np.asarray(g_w), one_w, rtol=0, atol=2 * w_atol)
    assert 2 * e_atol < 0.05 * np.abs(want_e).max() and 2 * w_atol < 0.05 * np.abs(want_w).max()
    # ... and the float64 oracle of Eq. 5 on them.
    np.testing.assert_allclose(float(loss), want, rtol=0, atol=loss_atol)
    np.testing.assert_allclose(np.asarray(g_e), want_e, rtol=0, atol=e_atol)
    np.testing.assert_allclose(np.asarray(g_w), want_w, rtol=0, atol=w_atol)
    assert not np.any(np.asarray(g_w)[~mask])  # centres that were not sampled get no gradient

    # Diagnostics, by NumPy.
    cos, _ = ref.cosines(e, w)
    pos, neg = ref.mlcd_sets(labels, k, mask)
    # Means of float32 cosines, each off by gamma(D) and both rows' normalisation (cos_err), plus the sums' gamma.
    cos_err = tolerances.gamma(D) + 2 * tolerances.unit_rows_relative_error(D)
    for got, sel in ((metrics["positive_cosine"], pos), (metrics["negative_cosine"], neg)):
        atol = cos_err + tolerances.mean_atol(int(sel.sum()), float(np.abs(cos[sel]).mean())) + U * abs(got)
        np.testing.assert_allclose(got, cos[sel].mean(), rtol=0, atol=atol)
    # Counts are exact in float32; the one division rounds by u, under 1e-6 = 16.8u.
    np.testing.assert_allclose(metrics["classes_hit_fraction"], len(np.unique(labels[labels >= 0])) / k, rtol=1e-6)
    np.testing.assert_allclose(metrics["labels_per_row"], (labels >= 0).sum() / B, rtol=1e-6)
    np.testing.assert_allclose(metrics["positive_term"] + metrics["negative_term"], want, rtol=0,
                               atol=loss_atol + 2 * U * want)  # two means where the loss takes one, and a sum


def test_sampling_depends_on_the_step_key():
    e, w, labels = objective_inputs()
    fn, _ = objective_on(tuple(dict(data=8, fsdp=1, tensor=1).items()), K)
    losses = {float(fn(e, w, labels, jax.random.PRNGKey(i))[0][0]) for i in range(3)}
    assert len(losses) == 3


def test_compiled_logits_are_b_global_by_sampled_centres_per_device():
    """On 8 devices the program's logits are [B_global, int(r K / 8)] = [24, 16], never [B, K / 8] = [24, 64]
    nor [B, K]; no device holds all [K, D] centres."""
    fn, mesh = objective_on(tuple(dict(data=8, fsdp=1, tensor=1).items()), K)
    e, w, labels = objective_inputs()
    sh = lambda spec: NamedSharding(mesh, spec)  # noqa: E731
    args = (jax.device_put(e, sh(P("data"))), jax.device_put(w, sh(P("data"))),
            jax.device_put(labels, sh(P("data"))), jax.random.PRNGKey(0))
    hlo = fn.lower(*args).compile().as_text()
    shapes = set(re.findall(r"f32\[(\d+),(\d+)\]", hlo))
    assert (str(B), "16") in shapes, sorted(shapes)
    assert (str(B), "64") not in shapes and (str(B), str(K)) not in shapes, sorted(shapes)
    assert (str(K), str(D)) not in shapes and ("64", str(D)) in shapes  # each device: its 64 centres only


# (K, sample rate, mesh): K not a multiple of pad_classes_to (256), so 240, 156 and 212 rows are padding; a
# shard with too few real rows draws padding rows (K 16), every row is scored (rate 1), whole padding shards (8).
PADDING_CASES = [(16, RATE, dict(data=1, fsdp=1, tensor=1)), (100, 0.1, dict(data=1, fsdp=1, tensor=1)),
                 (300, 1.0, dict(data=1, fsdp=1, tensor=1)), (16, RATE, dict(data=8, fsdp=1, tensor=1))]


@pytest.mark.parametrize("k,rate,mesh_shape", PADDING_CASES, ids=["k16", "k100", "k300_rate1", "k16_data8"])
def test_padding_rows_never_touch_the_loss_or_its_gradient(tmp_path, k, rate, mesh_shape):
    """Centres from a k-means file end in zero padding rows: finite gradients, exactly zero on the padding, and
    the same loss and gradients (bit for bit) whatever the padding rows hold, NaN included."""
    np.save(tmp_path / "centers.npy", np.random.default_rng(k).normal(size=(k, D)).astype(np.float32))
    config = mlcd_config(**{"mlcd.num_classes": k, "mlcd.sample_rate": rate, "mlcd.init_centers": str(tmp_path)})
    rows = partial_fc.padded_rows(k, config.mlcd.pad_classes_to)
    w = np.asarray(MLCD.init_params(jax.random.PRNGKey(0), config)[mlcd.CENTERS].unbox())
    assert w.shape == (rows, D) and rows % 256 == 0 and rows > k and not np.any(w[k:])
    rng = np.random.default_rng(1)
    e = ref.normalize(rng.normal(size=(B, D))).astype(np.float32)
    labels = distinct_labels(rng, B, L, k, pad=1)
    fn, _ = objective_fn(config, mesh_shape)
    (loss, _), (g_e, g_w) = jax.device_get(fn(e, w, labels, jax.random.PRNGKey(3)))
    assert np.isfinite(loss) and np.all(np.isfinite(g_e)) and np.all(np.isfinite(g_w[:k])) and np.any(g_w[:k])
    assert not np.any(g_w[k:])  # NaN is not zero either
    garbage = w.copy()
    garbage[k:] = np.nan
    (loss_g, _), (g_e_g, g_w_g) = jax.device_get(fn(e, garbage, labels, jax.random.PRNGKey(3)))
    assert loss_g == loss
    np.testing.assert_array_equal(g_e_g, g_e)
    np.testing.assert_array_equal(g_w_g, g_w)


# ----------------------------------------------------------------------------------------------------
# Config errors, naming the key.
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("key,value", [
    ("num_classes", 0), ("num_classes", 10.5), ("num_labels", 0), ("num_labels", 513), ("num_labels", True),
    ("sample_rate", 0.0), ("sample_rate", 1.5), ("scale", 0.0), ("scale", "32"), ("margin", -0.1),
    ("margin", 3.5), ("lr_mult", -1.0), ("init_centers", 3), ("init_centers", "/nonexistent/centers.npy"),
])
def test_config_errors_name_the_key(key, value):
    config = mlcd_config()
    with config.ignore_type():
        config.mlcd[key] = value
    with pytest.raises(ConfigError, match=rf"config\.mlcd\.{key}="):
        MLCD.validate(config)


def test_init_centers_of_the_wrong_shape_fail_in_build(tmp_path):
    np.save(tmp_path / "centers.npy", np.zeros((K + 1, D), np.float32))
    config = mlcd_config(**{"mlcd.init_centers": str(tmp_path)})
    with pytest.raises(ConfigError, match=r"config\.mlcd\.init_centers=.*\(513, 12\)"):
        build(config, jax.devices()[:1])


# ----------------------------------------------------------------------------------------------------
# A real train step.
# ----------------------------------------------------------------------------------------------------


def train_batches(config, n, seed=0):
    rng = np.random.default_rng(seed)
    out = helpers.random_batches(config, n, seed)
    for batch in out:
        batch["cluster_labels"] = distinct_labels(rng, config.batch_size, L, K, pad=1)
    return out


@pytest.mark.slow
def test_train_step_image_only_sharded_centres_and_lr_multiplier(tmp_path, recording):
    """A real step on 8 devices (data 2, fsdp 2, tensor 2): only the image tower runs, the batch holds
    cluster_labels, the centres are split over all 8 devices, start from the k-means file, and take AdamW's
    first step at 5x the learning rate. (Sharded against unsharded: the objective tests above.)"""
    rng = np.random.default_rng(1)
    centres = rng.normal(size=(K, D)).astype(np.float32)
    np.save(tmp_path / "centers.npy", centres)
    config = mlcd_config(**{"mlcd.init_centers": str(tmp_path), "optim.warmup_steps": 0})
    config.mesh.update(dict(data=2, fsdp=2, tensor=2))
    exp = build(config, jax.devices())
    assert exp.modalities == ("image",) and set(exp.fields) == {"image", "cluster_labels"}
    assert exp.fields["cluster_labels"].shape == (L,) and exp.fields["cluster_labels"].dtype == "int32"
    assert (mlcd.PARAM_PATTERN, {"lr_mult": 5.0}) in exp.param_groups
    assert exp.shardings["params"]["mlcd"]["centers"].spec == P(("data", "fsdp", "tensor"))
    state = exp.init_state()
    before = jax.device_get(state)
    # NumPy's float32 x / |x|: each entry within unit_rows_relative_error(D) = 8u of the float64 one.
    np.testing.assert_allclose(before["params"]["mlcd"]["centers"], ref.normalize(centres),
                               rtol=tolerances.unit_rows_relative_error(D), atol=0)
    new, metrics = exp.step(state, exp.global_batch(train_batches(config, 1)[0]))
    after, metrics = jax.device_get(new), {k: float(v) for k, v in metrics.items()}
    assert np.isfinite(metrics["mlcd/loss"]) and metrics["mlcd/classes_hit_fraction"] > 0
    grads = after["opt_state"][0].grads
    # The text tower never ran: no gradient, so it is bit for bit what it was.
    assert not any(np.any(g) for g in jax.tree.leaves(grads["text"]))
    for a, b in zip(jax.tree.leaves(after["params"]["text"]), jax.tree.leaves(before["params"]["text"])):
        np.testing.assert_array_equal(a, b)
    # AdamW's first step with lr_mult 5 on the centres: -5 lr (g / (|g| + eps) + wd w), g clipped by global norm.
    optim = config.optim
    clip = min(1.0, optim.grad_clip_norm / metrics["grad_norm"])
    w0 = before["params"]["mlcd"]["centers"].astype(np.float64)
    g = np.asarray(grads["mlcd"]["centers"], np.float64) * clip
    assert np.abs(g).max() > 1e-4 and (g == 0).mean() > 0.5  # sampled centres only (r = 0.25)
    want = w0 - 5.0 * optim.lr * (g / (np.abs(g) + optim.eps) + optim.weight_decay * w0)
    # Float32 AdamW: the update within ~8u of its size 5 lr (1 + wd |w|) (moments, bias corrections, sqrt,
    # division; the clip cancels in g / |g|) and the subtraction within u of the result: 8u 5 lr < 1e-8 <= atol.
    np.testing.assert_allclose(after["params"]["mlcd"]["centers"], want, rtol=1e-4, atol=1e-7)
