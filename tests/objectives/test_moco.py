"""The 'brivl' objective (cross-modal MoCo): moco_loss, brivl_loss, enqueue and momentum_update against the
float64 NumPy transcriptions of MoCo and BriVL (``moco_reference``), loss and gradient with respect to the
raw query features, sharded equal to one device; then training: meshes equal to one device, the momentum
towers, the ring queues, checkpoints, config errors, the learnable temperature and the knobs in a real step."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from clus_jax.config import check as config_check
from clus_jax.train.experiment import build
from clus_jax.objectives import registry
from clus_jax.objectives.moco import brivl_loss, enqueue, moco_loss, momentum_update, multi_label_positives
from clus_jax.objectives.registry import ConfigError
from clus_jax.train.checkpoint import Checkpointer
from clus_jax.train.step import make_apply_model
import moco_reference as ref  # registered by tests/conftest.py
import tolerances  # registered by tests/conftest.py
import train_helpers as helpers  # registered by tests/conftest.py

# Float64 against the float64 oracle: the bounds below with u = 2^-53 are below 1e-11 relative, far under RTOL64.
# Float32 against it: the bounds below, derived per case (moco_bounds).
RTOL64 = 1e-9
U = tolerances.U32


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


def moco_bounds(x, keys, queue, temperature, loss, topk=0, rounded_temperature=False):
    """(loss atol, gradient atol) of one float32 evaluation of InfoNCE on raw queries ``x`` [B, D] against the
    float64 oracle on the same float32 inputs, for one direction (``topk``: extra positives per row, at most).

    ``q = x / |x|`` errs by unit_rows_relative_error(D) per element; a cosine with a key or queue row (norms
    <= kn) by gamma(D) plus that, times kn; dividing by T rounds once (|logit| <= kn / T), and a temperature
    rounded to float32 (``rounded_temperature``; the oracle's is exact) moves it by u once more. Each row's
    1 + topk positives' -log p err by log_softmax_atol over K + 1 logits; summing them and the B-row mean add
    gamma of the loss. Gradient: ``g_q = sum_j ((1 + m) p_j - y_j) k_j / (T B)``, weights adding up to 2 (1 + topk) off
    by p's relative error, and the (K + 1)-term sum's gamma, in 2-norm (|k_j| <= kn); the normalisation's
    backward ``(g_q - q (q . g_q)) / |x|`` passes that error twice and adds the D-term dot's gamma, q's error
    twice and a few roundings, over the smallest |x|.
    """
    batch, dim = np.shape(x)
    n, kn = len(queue) + 1, max(float(np.linalg.norm(v, axis=1).max()) for v in (keys, queue))
    ure, g = tolerances.unit_rows_relative_error(dim), tolerances.gamma
    t_err = U if rounded_temperature else 0.0
    logit_atol = ((g(dim) + ure) * kn + U + t_err * kn) / temperature
    p_err = tolerances.log_softmax_atol(n, logit_atol, kn / temperature)
    loss_atol = (1 + topk) * p_err + (g(1 + topk) + g(batch) + 2 * U) * loss
    g_q, g_q_err = 2 * (1 + topk) * kn / (temperature * batch), (1 + topk) * kn / (temperature * batch) * (
        p_err + 2 * g(n) + 3 * U + t_err)
    grad_atol = (2 * g_q_err + (g(dim) + 2 * ure + 6 * U) * g_q) / float(np.linalg.norm(x, axis=1).min())
    return loss_atol, grad_atol


def unit(x):
    x = np.asarray(x, np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def normalize(x):
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def paired_inputs(rng, b, d, k, noise=0.8):
    """Raw (not unit) image and text query features, unit keys near them and paired unit queues."""
    base = rng.normal(size=(b, d))
    scale = rng.uniform(0.5, 3.0, (b, 1))
    image_x = scale * (base + noise * rng.normal(size=base.shape))
    text_x = scale * (base + noise * rng.normal(size=base.shape))
    image_k = unit(base + noise * rng.normal(size=base.shape))
    text_k = unit(base + noise * rng.normal(size=base.shape))
    queue_base = rng.normal(size=(k, d))
    image_queue = unit(queue_base + noise * rng.normal(size=queue_base.shape))
    text_queue = unit(queue_base + noise * rng.normal(size=queue_base.shape))
    return image_x, text_x, image_k, text_k, image_queue, text_queue


# (B, D, K, T): several shapes; T = 0.007 gives logits of order 100.
CASES = [(4, 8, 12, 0.07), (16, 32, 64, 0.2), (8, 16, 40, 0.007), (2, 4, 6, 0.2)]
PRECISIONS = [np.float64, np.float32]
PRECISION_IDS = ["float64", "float32"]


@pytest.fixture(params=PRECISIONS, ids=PRECISION_IDS)
def precision(request):
    dtype = request.param
    with jax.enable_x64(dtype == np.float64):
        yield dtype


def as_dtype(dtype, *xs):
    """Inputs rounded to ``dtype``: the oracle then sees exactly what the implementation sees."""
    return [np.asarray(x, dtype) for x in xs]


def moco_oracle(x, k, queue, temperature, extra=None):
    q = ref.normalize_numpy(x)
    loss = ref.info_nce_numpy(q, k, queue, temperature, extra)
    return loss, ref.normalize_backward_numpy(x, ref.info_nce_grad_numpy(q, k, queue, temperature, extra))


def brivl_oracle(image_x, text_x, image_k, text_k, image_queue, text_queue, temperature, topk):
    image_q, text_q = ref.normalize_numpy(image_x), ref.normalize_numpy(text_x)
    loss, _, _ = ref.brivl_loss_numpy(image_q, text_q, image_k, text_k, image_queue, text_queue, temperature, topk)
    g_image, g_text = ref.brivl_loss_grads_numpy(image_q, text_q, image_k, text_k, image_queue, text_queue,
                                                 temperature, topk)
    return loss, ref.normalize_backward_numpy(image_x, g_image), ref.normalize_backward_numpy(text_x, g_text)


@pytest.mark.parametrize("b,d,k,temperature", CASES)
def test_moco_loss_and_gradient_match_numpy(b, d, k, temperature, precision):
    dtype = precision
    image_x, _, _, text_k, _, text_queue = as_dtype(dtype, *paired_inputs(np.random.default_rng(b * k), b, d, k))
    fn = jax.jit(jax.value_and_grad(lambda x, key, queue: moco_loss(normalize(x), key, queue, temperature)))
    loss, grad = fn(jnp.asarray(image_x), jnp.asarray(text_k), jnp.asarray(text_queue))
    assert loss.dtype == dtype and grad.dtype == dtype
    want_loss, want_grad = moco_oracle(image_x, text_k, text_queue, temperature)
    loss_atol, grad_atol = moco_bounds(image_x, text_k, text_queue, temperature, want_loss)
    assert_matches(float(loss), want_loss, dtype, loss_atol)
    assert_matches(grad, want_grad, dtype, grad_atol)
    # A wrong temperature, a dropped term or no normalisation backward moves the gradient by a good part of it.
    assert grad_atol < 0.05 * float(np.abs(want_grad).max()) and loss_atol < 0.01 * want_loss


def test_moco_loss_large_logits_are_stable():
    """T = 0.007 with the key almost equal to the query: logits ~ 143, softmax far from uniform, no overflow."""
    rng = np.random.default_rng(11)
    x = rng.normal(size=(8, 16))
    key = unit(x + 0.01 * rng.normal(size=x.shape))
    queue = unit(np.concatenate([x[:3] + 0.05 * rng.normal(size=(3, 16)), rng.normal(size=(29, 16))]))
    assert ref.moco_logits_numpy(unit(x), key, queue, 0.007).max() > 140
    for dtype in PRECISIONS:
        with jax.enable_x64(dtype == np.float64):
            xd, kd, qd = as_dtype(dtype, x, key, queue)
            # A traced temperature, as the learnable one is.
            fn = jax.jit(jax.value_and_grad(lambda x, t: moco_loss(normalize(x), kd, qd, t)))
            loss, grad = fn(xd, jnp.asarray(0.007, dtype))
            want_loss, want_grad = moco_oracle(xd, kd, qd, 0.007)
            assert np.isfinite(float(loss)) and np.all(np.isfinite(np.asarray(grad)))
            loss_atol, grad_atol = moco_bounds(xd, kd, qd, 0.007, want_loss, rounded_temperature=True)
            assert_matches(float(loss), want_loss, dtype, loss_atol, err_msg=str(dtype))
            assert_matches(grad, want_grad, dtype, grad_atol, err_msg=str(dtype))


def test_moco_loss_sends_no_gradient_into_keys_or_queue():
    image_x, _, _, text_k, _, text_queue = paired_inputs(np.random.default_rng(0), 8, 16, 32)
    g_key, g_queue = jax.grad(lambda k, qu: moco_loss(normalize(jnp.asarray(image_x, jnp.float32)), k, qu, 0.07),
                              argnums=(0, 1))(jnp.asarray(text_k, jnp.float32), jnp.asarray(text_queue, jnp.float32))
    assert not np.any(np.asarray(g_key)) and not np.any(np.asarray(g_queue))


# (B, D, K, T, multi_label_topk)
BRIVL_CASES = [(4, 8, 12, 0.07, 0), (16, 32, 64, 0.2, 3), (8, 16, 40, 0.007, 5), (32, 8, 96, 0.07, 8)]


@pytest.mark.parametrize("b,d,k,temperature,topk", BRIVL_CASES)
def test_brivl_loss_and_gradients_match_numpy(b, d, k, temperature, topk, precision):
    dtype = precision
    inputs = as_dtype(dtype, *paired_inputs(np.random.default_rng(7 * b + k), b, d, k))
    image_x, text_x, image_k, text_k, image_queue, text_queue = inputs
    if topk:  # the multi-label positives are present and are what the loss uses
        mask = ref.multi_label_mask_numpy(image_k, text_k, image_queue, text_queue, topk)
        assert mask.any() and not mask.all()
        got_mask = multi_label_positives(*[jnp.asarray(v) for v in (image_k, text_k, image_queue, text_queue)], topk)
        np.testing.assert_array_equal(np.asarray(got_mask), mask)

    def fn(ix, tx, ik, tk, iq, tq):
        return brivl_loss(normalize(ix), normalize(tx), ik, tk, iq, tq, temperature, topk)

    loss, (g_image, g_text) = jax.jit(jax.value_and_grad(fn, argnums=(0, 1)))(*[jnp.asarray(v) for v in inputs])
    assert loss.dtype == dtype
    want_loss, want_image, want_text = brivl_oracle(*inputs, temperature, topk)
    # Two directions: the sum of their loss bounds; each gradient comes from one direction.
    i2t_atol, image_atol = moco_bounds(image_x, text_k, text_queue, temperature, want_loss, topk)
    t2i_atol, text_atol = moco_bounds(text_x, image_k, image_queue, temperature, want_loss, topk)
    loss_atol = i2t_atol + t2i_atol
    assert_matches(float(loss), want_loss, dtype, loss_atol)
    assert_matches(g_image, want_image, dtype, image_atol)
    assert_matches(g_text, want_text, dtype, text_atol)
    assert max(image_atol, text_atol) < 0.05 * min(np.abs(want_image).max(), np.abs(want_text).max())
    # The sum of the two directions (not their mean), each MoCo's loss when there are no extra positives.
    if not topk:
        i2t = ref.info_nce_numpy(ref.normalize_numpy(image_x), text_k, text_queue, temperature)
        t2i = ref.info_nce_numpy(ref.normalize_numpy(text_x), image_k, image_queue, temperature)
        assert_matches(float(loss), i2t + t2i, dtype, loss_atol)
    else:
        without, _, _ = brivl_oracle(*inputs, temperature, 0)
        assert want_loss > without + 1e-3  # the extra positives add terms


def test_brivl_loss_sends_no_gradient_into_keys_or_queues():
    inputs = [jnp.asarray(v, jnp.float32) for v in paired_inputs(np.random.default_rng(1), 8, 16, 32)]
    image_q, text_q = normalize(inputs[0]), normalize(inputs[1])
    grads = jax.grad(lambda *kq: brivl_loss(image_q, text_q, *kq, 0.07, 4), argnums=(0, 1, 2, 3))(*inputs[2:])
    assert all(not np.any(np.asarray(g)) for g in grads)


def fake_mesh(shape, names):
    return jax.make_mesh(shape, names, axis_types=(AxisType.Auto,) * len(shape))


SHARDED_MESHES = [((8,), ("data",), "data"), ((4, 2), ("data", "fsdp"), ("data", "fsdp"))]


@pytest.mark.parametrize("shape,names,axes", SHARDED_MESHES, ids=["data8", "data4_fsdp2"])
def test_sharded_losses_equal_unsharded(shape, names, axes):
    """Inside shard_map with the rows split over 8 devices: the same loss and row gradients, float64."""
    mesh = fake_mesh(shape, names)
    rows, rep = P(axes), P()
    with jax.enable_x64(True):
        inputs = paired_inputs(np.random.default_rng(5), 32, 16, 48)
        image_x, text_x, image_k, text_k, image_queue, text_queue = inputs
        placed = [jax.device_put(jnp.asarray(v), NamedSharding(mesh, rows if i < 4 else rep))
                  for i, v in enumerate(inputs)]

        def sharded_moco(x, key, queue):
            return jax.shard_map(lambda x, key, queue: moco_loss(normalize(x), key, queue, 0.07, axis_name=axes),
                                 mesh=mesh, in_specs=(rows, rows, rep), out_specs=P())(x, key, queue)

        loss, grad = jax.jit(jax.value_and_grad(sharded_moco))(placed[0], placed[3], placed[5])
        unsharded = jax.jit(lambda x, key, queue: moco_loss(normalize(x), key, queue, 0.07))(
            image_x, text_k, text_queue)
        want_loss, want_grad = moco_oracle(image_x, text_k, text_queue, 0.07)
        assert loss.dtype == jnp.float64
        np.testing.assert_allclose(float(loss), float(unsharded), rtol=RTOL64)
        np.testing.assert_allclose(float(loss), want_loss, rtol=RTOL64)
        assert_close(grad, want_grad, RTOL64)

        for topk in (0, 5):
            def sharded_brivl(ix, tx, ik, tk, iq, tq, topk=topk):
                body = lambda ix, tx, ik, tk, iq, tq: brivl_loss(  # noqa: E731
                    normalize(ix), normalize(tx), ik, tk, iq, tq, 0.2, topk, axis_name=axes)
                return jax.shard_map(body, mesh=mesh, in_specs=(rows,) * 4 + (rep,) * 2, out_specs=P())(
                    ix, tx, ik, tk, iq, tq)

            loss, (g_image, g_text) = jax.jit(jax.value_and_grad(sharded_brivl, argnums=(0, 1)))(*placed)
            unsharded = jax.jit(lambda ix, tx, ik, tk, iq, tq, topk=topk: brivl_loss(
                normalize(ix), normalize(tx), ik, tk, iq, tq, 0.2, topk))(*inputs)
            want_loss, want_image, want_text = brivl_oracle(*inputs, 0.2, topk)
            np.testing.assert_allclose(float(loss), float(unsharded), rtol=RTOL64, err_msg=f"topk={topk}")
            np.testing.assert_allclose(float(loss), want_loss, rtol=RTOL64, err_msg=f"topk={topk}")
            assert_close(g_image, want_image, RTOL64, err_msg=f"topk={topk}")
            assert_close(g_text, want_text, RTOL64, err_msg=f"topk={topk}")


@pytest.mark.parametrize("length,batch,start", [(12, 4, 0), (12, 4, 4), (12, 4, 8), (64, 16, 48), (6, 6, 0)])
def test_enqueue_is_a_ring_buffer(length, batch, start, precision):
    """A run of writes from ``start``: each lands at the pointer, the pointer wraps to 0 at the end."""
    dtype = precision
    rng = np.random.default_rng(length + batch + start)
    queue = np.asarray(rng.normal(size=(length, 3)), dtype)
    want_queue, want_ptr = queue, start
    got_queue, got_ptr = jnp.asarray(queue), jnp.int32(start)
    step = jax.jit(enqueue)
    for _ in range(length // batch + 2):  # past one full turn
        keys = np.asarray(rng.normal(size=(batch, 3)), dtype)
        want_queue, want_ptr = ref.enqueue_numpy(want_queue, want_ptr, keys)
        got_queue, got_ptr = step(got_queue, got_ptr, jnp.asarray(keys))
        assert got_ptr.dtype == jnp.int32 and got_queue.dtype == dtype
        assert int(got_ptr) == want_ptr
        np.testing.assert_array_equal(np.asarray(got_queue), want_queue)  # copies: exact


def test_enqueue_rejects_a_length_that_is_not_a_multiple_and_stops_gradients():
    with pytest.raises(ValueError, match="not a multiple"):
        enqueue(jnp.zeros((10, 2)), jnp.int32(0), jnp.ones((4, 2)))
    grad = jax.grad(lambda k: jnp.sum(enqueue(jnp.zeros((8, 2)), jnp.int32(4), k)[0]))(jnp.ones((4, 2)))
    assert not np.any(np.asarray(grad))


def random_tree(rng, dtype):
    return {"image": {"kernel": rng.normal(size=(3, 4)).astype(dtype), "bias": rng.normal(size=(4,)).astype(dtype)},
            "logit_scale": np.asarray(rng.normal(), dtype)}


@pytest.mark.parametrize("m", [0.99, 0.5, 0.0, 1.0])
def test_momentum_update_matches_moco(m, precision):
    dtype = precision
    rng = np.random.default_rng(int(m * 100))
    key_params, query_params = random_tree(rng, dtype), random_tree(rng, dtype)
    for momentum in (m, jnp.asarray(m, dtype)):
        got = jax.jit(momentum_update)(key_params, query_params, momentum)
        want = jax.tree.map(lambda k, q: ref.momentum_update_numpy(np.float64(k), np.float64(q), m), key_params,
                            query_params)
        for g, w, k_leaf, q_leaf in zip(jax.tree.leaves(got), jax.tree.leaves(want), jax.tree.leaves(key_params),
                                        jax.tree.leaves(query_params)):
            assert g.dtype == dtype
            # m and 1 - m round to float32 (u m each), the two products and the sum once each: within
            # 3u (|k| + |q|) per entry.
            float32_atol = 3 * U * float(np.max(np.abs(k_leaf) + np.abs(q_leaf)))
            assert_matches(np.asarray(g), w, dtype, float32_atol)
    if m in (0.0, 1.0):  # the ends are exact (products by 0 and 1, sums with 0): the query or the key towers
        source = query_params if m == 0.0 else key_params
        ends = jax.jit(momentum_update)(key_params, query_params, m)
        for g, w in zip(jax.tree.leaves(ends), jax.tree.leaves(source)):
            np.testing.assert_array_equal(np.asarray(g), w)
    grad = jax.grad(lambda q: sum(jnp.sum(x) for x in jax.tree.leaves(momentum_update(key_params, q, m))))(query_params)
    assert all(not np.any(np.asarray(g)) for g in jax.tree.leaves(grad))


# ----------------------------------------------------------------------------------------------------
# Config errors: in build, naming the key.
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("key,value", [
    ("queue_length", 24), ("queue_length", 0), ("queue_length", 40.0),
    ("momentum", 1.5), ("momentum", -0.1), ("momentum_final", 1.01),
    ("temperature", 0.0), ("temperature", -0.07),
    ("multi_label_topk", -1), ("multi_label_topk", 65), ("multi_label_topk", 2.5),
    ("learnable_temperature", "yes"),
])
def test_config_errors_name_the_key(key, value):
    config = helpers.tiny_config("brivl", **{"brivl.queue_length": 64, "mesh.data": 1})
    with config.ignore_type():  # a config file may hold any type; validation must name the key
        config.brivl[key] = value
    with pytest.raises(ConfigError, match=rf"config\.brivl\.{key}="):
        build(config, jax.devices()[:1])


def test_boundary_config_values_are_valid():
    for key, value in (("momentum", 0.0), ("momentum", 1.0), ("multi_label_topk", 64), ("multi_label_topk", 0),
                       ("queue_length", 16), ("temperature", 1e-3)):
        config_check.validate(helpers.tiny_config("brivl", **{"brivl.queue_length": 64, f"brivl.{key}": value}), 8)


# ----------------------------------------------------------------------------------------------------
# Training: non-default knobs, a queue that wraps, one device vs 8, checkpoints.
# ----------------------------------------------------------------------------------------------------

STEPS, QUEUE, TEMPERATURE, TOPK, M0, M1 = 5, 64, 0.1, 4, 0.8, 0.95  # batch 16: the queue wraps after 4 steps


def train_config(mesh_shape, **overrides):
    settings = {"model.image.depth": 1, "model.text.depth": 1, "model.text.vocab_size": 1024,  # fast to compile
                # Mean pooling: a 1-block ViT's CLS output is nearly the same for every noise image (cosine
                # 0.99997), which leaves the image top-k of the multi-label mask to float32 rounding.
                "model.image.pooling": "gap",
                "optim.warmup_steps": 0,  # the student moves from step 0, so step 2's towers are a real mix
                "brivl.queue_length": QUEUE, "brivl.temperature": TEMPERATURE, "brivl.multi_label_topk": TOPK,
                "brivl.momentum": M0, "brivl.momentum_final": M1}
    config = helpers.tiny_config("brivl", **{**settings, **overrides})
    config.mesh.update(mesh_shape)
    return config


class Run:
    """A few train steps; keeps a host copy of the state before every step and after the last."""

    def __init__(self, config, devices, batches, start=None, first_step=0):
        self.config = config
        self.exp = build(config, devices)
        state = self.exp.init_state() if start is None else start
        self.batches, self.states, self.metrics = batches, [jax.device_get(state)], []
        for local in batches[first_step:]:
            state, metrics = self.exp.step(state, self.exp.global_batch(local))
            self.states.append(jax.device_get(state))
            self.metrics.append({k: float(v) for k, v in metrics.items()})

    def on_device(self, host_state):
        return jax.device_put(host_state, self.exp.shardings)

    def brivl(self, t):
        return self.states[t]["objective_states"]["brivl"]


# The towers: depth-1 'mu' blocks of width 64 and MLP 256 (the longest reduction), depth 2 with the embedding and
# head: an embedding recomputed in another program differs by tolerances.network_atol(256, |e|, 2), an estimate.
N_REDUCE, FORWARD_DEPTH = 256, 2


def cosine_momentum(t, total):
    """The momentum schedule, written out: M1 - (M1 - M0) (1 + cos(pi t / total)) / 2."""
    return M1 - (M1 - M0) * (1 + math.cos(math.pi * min(t / total, 1.0))) / 2


@pytest.fixture(scope="module")
def reference():
    config = train_config(dict(data=1, fsdp=1, tensor=1))
    return Run(config, jax.devices()[:1], helpers.random_batches(config, STEPS))


@pytest.fixture(scope="module")
def apply(reference):
    return jax.jit(make_apply_model(reference.exp.model))


def embeddings(apply, params, local):
    out = apply(registry.model_params(params), {k: jnp.asarray(v) for k, v in local.items()})
    return np.asarray(out["image_emb"], np.float64), np.asarray(out["text_emb"], np.float64)


def step_keys(run, t):
    """The keys step t computed, exactly: the rows it wrote into the queues (test_queues_are_rings_of_the_momentum_keys
    checks that they are the momentum towers' embeddings). Recomputing them would round differently and could
    flip a near-tie of the multi-label top-k."""
    ptr, batch = int(run.brivl(t)["pointer"]), run.config.batch_size
    after = run.brivl(t + 1)
    return [np.asarray(after[name][ptr:ptr + batch], np.float64) for name in ("image_queue", "text_queue")]


def oracle_step(run, apply, t, temperature, topk):
    """(loss, i2t, t2i) of step t by the oracle: queries from the student at the start of the step, the step's
    keys, the queues before the step."""
    image_q, text_q = embeddings(apply, run.states[t]["params"], run.batches[t])
    image_k, text_k = step_keys(run, t)
    before = run.brivl(t)
    return ref.brivl_loss_numpy(image_q, text_q, image_k, text_k, before["image_queue"], before["text_queue"],
                                temperature, topk)


def oracle_atols(run, apply, t, temperature, topk, i2t, t2i):
    """(i2t atol, t2i atol) of step t's metrics against oracle_step: one float32 evaluation (moco_bounds on the
    unit queries) plus the oracle's recomputed queries, which move by network_atol(N_REDUCE, 1, FORWARD_DEPTH) in
    norm: each cosine by that, each logit by that over T, each -log p by twice that, for 1 + (extra positives per
    row) terms per row."""
    image_q, text_q = embeddings(apply, run.states[t]["params"], run.batches[t])
    image_k, text_k = step_keys(run, t)
    before = run.brivl(t)
    move = tolerances.network_atol(N_REDUCE, 1.0, FORWARD_DEPTH) / temperature
    recomputed = 2 * move * (1 + run.metrics[t]["brivl/extra_positives_per_row"])
    return (moco_bounds(image_q, text_k, before["text_queue"], temperature, i2t, topk)[0] + recomputed,
            moco_bounds(text_q, image_k, before["image_queue"], temperature, t2i, topk)[0] + recomputed)


@pytest.mark.slow
def test_momentum_towers_follow_the_formula_before_the_keys(reference):
    first = reference.states[0]
    # They start as the student's own towers (not the objective's state, nothing else).
    towers0 = reference.brivl(0)["momentum_towers"]
    assert set(towers0) == set(registry.model_params(first["params"]))
    for a, b in zip(jax.tree.leaves(towers0), jax.tree.leaves(registry.model_params(first["params"]))):
        np.testing.assert_array_equal(a, b)
    for t in range(STEPS):
        m = cosine_momentum(t, reference.config.total_steps)
        # The float32 schedule rounds a few times, each by at most u m (cos's argument error is damped by
        # (M1 - M0) / 2): within 5u of m, under 1e-6 = 16.8u.
        np.testing.assert_allclose(reference.metrics[t]["brivl/momentum"], m, rtol=1e-6)
        # From the student at the START of step t (states[t]), not after its update (states[t + 1]).
        old, student = reference.brivl(t)["momentum_towers"], registry.model_params(reference.states[t]["params"])
        want = jax.tree.map(lambda k, q: ref.momentum_update_numpy(np.float64(k), np.float64(q), m), old, student)
        for (path, got), w, k, q in zip(jax.tree_util.tree_leaves_with_path(reference.brivl(t + 1)["momentum_towers"]),
                                        jax.tree.leaves(want), jax.tree.leaves(old), jax.tree.leaves(student)):
            # 3u (|k| + |q|) from the update's roundings, and the float32 m (within 5u) times |k - q|.
            k, q = np.asarray(k, np.float64), np.asarray(q, np.float64)
            atol = 3 * U * float(np.max(np.abs(k) + np.abs(q))) + 5 * U * float(np.max(np.abs(k - q)))
            np.testing.assert_allclose(got, w, rtol=0, atol=atol, err_msg=f"step {t} {jax.tree_util.keystr(path)}")
    # Step 1: m init + (1 - m) init = the initial student.
    for a, b in zip(jax.tree.leaves(reference.brivl(1)["momentum_towers"]),
                    jax.tree.leaves(registry.model_params(first["params"]))):
        # m k + (1 - m) k rounds three times and 1 - m once more than m: within 4u |k|.
        np.testing.assert_allclose(a, b, rtol=0, atol=4 * U * float(np.abs(b).max()))
    # The student moved in step 1, so the towers of step 2 are a genuine mix (a copy of neither).
    kernel = lambda s: np.asarray(s["text"]["token_embed"], np.float64)  # noqa: E731
    student1, towers1 = kernel(reference.states[1]["params"]), kernel(reference.brivl(1)["momentum_towers"])
    towers2 = kernel(reference.brivl(2)["momentum_towers"])
    assert np.abs(student1 - towers1).max() > 1e-4
    assert np.abs(towers2 - student1).max() > 1e-5 and np.abs(towers2 - towers1).max() > 1e-5


@pytest.mark.slow
def test_queues_are_rings_of_the_momentum_keys(reference, apply):
    batch = reference.config.batch_size
    init = reference.brivl(0)
    for name in ("image_queue", "text_queue"):
        assert init[name].shape == (QUEUE, reference.config.model.embed_dim)
        atol = tolerances.unit_norm_atol(reference.config.model.embed_dim)
        np.testing.assert_allclose(np.linalg.norm(init[name], axis=1), 1.0, rtol=0, atol=atol)
    assert not np.allclose(init["image_queue"], init["text_queue"])  # independent random rows: far apart
    assert int(init["pointer"]) == 0 and int(init["keys_written"]) == 0
    for t in range(STEPS):
        before, after = reference.brivl(t), reference.brivl(t + 1)
        ptr = int(before["pointer"])
        assert ptr == (batch * t) % QUEUE
        assert int(after["pointer"]) == (ptr + batch) % QUEUE
        assert int(after["keys_written"]) == min(batch * (t + 1), QUEUE)
        # An integer over a power of two: exact.
        np.testing.assert_allclose(reference.metrics[t]["brivl/queue_fill"], min(batch * t, QUEUE) / QUEUE, rtol=0)
        # Keys from the momentum towers the step wrote (updated before the keys were computed).
        image_k, text_k = embeddings(apply, after["momentum_towers"], reference.batches[t])
        for name, keys in (("image_queue", image_k), ("text_queue", text_k)):
            want, _ = ref.enqueue_numpy(before[name], ptr, keys)
            atol = tolerances.network_atol(N_REDUCE, float(np.abs(keys).max()), FORWARD_DEPTH)  # recomputed keys
            np.testing.assert_allclose(after[name], want, rtol=0, atol=atol, err_msg=f"step {t} {name}")
            rest = np.ones(QUEUE, bool)
            rest[ptr:ptr + batch] = False
            np.testing.assert_array_equal(after[name][rest], before[name][rest])
    assert int(reference.brivl(STEPS)["pointer"]) == batch  # wrapped: step 4 wrote rows 0..15 again


@pytest.mark.slow
def test_knobs_reach_the_loss_in_a_train_step(reference, apply):
    """temperature, multi_label_topk and momentum (via the keys) as set, in the real step, against the oracle."""
    for t in range(STEPS):
        loss, i2t, t2i = oracle_step(reference, apply, t, TEMPERATURE, TOPK)
        metrics = reference.metrics[t]
        i2t_atol, t2i_atol = oracle_atols(reference, apply, t, TEMPERATURE, TOPK, i2t, t2i)
        np.testing.assert_allclose(metrics["brivl/loss"], loss, rtol=0, atol=i2t_atol + t2i_atol, err_msg=f"step {t}")
        np.testing.assert_allclose(metrics["brivl/i2t"], i2t, rtol=0, atol=i2t_atol, err_msg=f"step {t}")
        np.testing.assert_allclose(metrics["brivl/t2i"], t2i, rtol=0, atol=t2i_atol, err_msg=f"step {t}")
        # float32(0.1) is 0.1 within u (1.5e-8 relative).
        np.testing.assert_allclose(metrics["brivl/temperature"], TEMPERATURE, rtol=1e-7)
        assert metrics["brivl/extra_positives_per_row"] > 0
        # The defaults would give another loss, by more than the tolerance: each knob is visible in the value.
        default_t, _, _ = oracle_step(reference, apply, t, 0.07, TOPK)
        no_topk, _, _ = oracle_step(reference, apply, t, TEMPERATURE, 0)
        assert min(abs(default_t - loss), abs(no_topk - loss)) > max(1e-2, 2 * (i2t_atol + t2i_atol))
    # The keys the step used come from the towers moved with the scheduled momentum, not the default 0.99.
    t = 2
    m = cosine_momentum(t, reference.config.total_steps)
    for momentum, close in ((m, True), (0.99, False)):
        towers = jax.tree.map(lambda k, q, momentum=momentum: momentum * k + (1 - momentum) * q,
                              reference.brivl(t)["momentum_towers"],
                              registry.model_params(reference.states[t]["params"]))
        gap = max(np.abs(a - b).max() for a, b in zip(embeddings(apply, towers, reference.batches[t]),
                                                      step_keys(reference, t)))
        assert (gap < 1e-5) if close else (gap > 1e-3), (momentum, gap)


@pytest.mark.slow
def test_fixed_temperature_leaves_the_logit_scale_alone(reference):
    for state in reference.states[1:]:
        np.testing.assert_array_equal(state["params"]["logit_scale"], reference.states[0]["params"]["logit_scale"])


MESHES = [dict(data=8, fsdp=1, tensor=1), dict(data=4, fsdp=2, tensor=1)]


@pytest.mark.slow
@pytest.mark.parametrize("mesh_shape", MESHES, ids=["data8", "data4_fsdp2"])
def test_meshes_match_one_device(reference, mesh_shape):
    run = Run(train_config(mesh_shape), jax.devices(), reference.batches)
    assert run.exp.shardings["objective_states"]["brivl"]["image_queue"].spec == P()
    # Observed margins, not bounds (the runs train on different roundings, and Adam below has none): the losses
    # differ by at most 1.5e-7 relative over the 5 steps; network_atol's estimate of one evaluation is ~3e-4.
    for key in ("loss", "brivl/loss", "brivl/i2t", "brivl/t2i", "brivl/extra_positives_per_row"):
        np.testing.assert_allclose([m[key] for m in run.metrics], [m[key] for m in reference.metrics], rtol=1e-5,
                                   err_msg=key)
    for t in (1, STEPS):
        got, want = run.brivl(t), reference.brivl(t)
        assert int(got["pointer"]) == int(want["pointer"]) and int(got["keys_written"]) == int(want["keys_written"])
    # Adam divides by sqrt(v): near-zero gradients amplify reduction-order rounding to a fraction of one step.
    # Not a bound: an entry within rounding of zero could flip the sign of a first Adam step (2 lr = 6e-3).
    got, want = run.states[-1], reference.states[-1]
    for part in ("params", "objective_states"):
        for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got[part]), jax.tree.leaves(want[part])):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-5,
                                       err_msg=f"{mesh_shape} {part}{jax.tree_util.keystr(path)}")


@pytest.mark.slow
def test_checkpoint_restores_queues_pointer_and_towers_exactly(reference, tmp_path):
    mid = 3  # pointer 48: the next two steps write the last rows and wrap to 0
    ckpt = Checkpointer(str(tmp_path / "checkpoints"))
    ckpt.save(mid, reference.on_device(reference.states[mid]), force=True)
    ckpt.wait()
    step, restored = ckpt.restore(reference.exp.abstract_state)
    ckpt.close()
    assert step == mid
    host = jax.device_get(restored)
    assert set(host["objective_states"]["brivl"]) == {"momentum_towers", "image_queue", "text_queue", "pointer",
                                                      "keys_written"}
    assert int(host["objective_states"]["brivl"]["pointer"]) == 48
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(host), jax.tree.leaves(reference.states[mid])):
        np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))
    # Training on from the restored state repeats the uninterrupted run bit for bit.
    state = restored
    for t in range(mid, STEPS):
        state, metrics = reference.exp.step(state, reference.exp.global_batch(reference.batches[t]))
        assert float(metrics["loss"]) == reference.metrics[t]["loss"], f"step {t}"
        for a, b in zip(jax.tree.leaves(jax.device_get(state)), jax.tree.leaves(reference.states[t + 1])):
            np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_learnable_temperature_is_one_over_the_logit_scale(reference, apply):
    """T = 1 / exp(params['logit_scale']) in the loss (not config.brivl.temperature), and it trains."""
    scale_init = math.log(1 / 0.05)
    config = train_config(dict(data=1, fsdp=1, tensor=1),
                          **{"brivl.learnable_temperature": True, "model.logit_scale_init": scale_init})
    run = Run(config, jax.devices()[:1], reference.batches[:2])
    scales = [float(s["params"]["logit_scale"]) for s in run.states]
    assert scales[0] == pytest.approx(scale_init)
    assert scales[1] != scales[0] and scales[2] != scales[1]  # a gradient from the brivl loss alone
    for t in range(2):
        temperature = 1.0 / math.exp(scales[t])
        # exp (2 ulp) and a reciprocal of the same float32 scale: within 5u, under 1e-6 = 16.8u.
        np.testing.assert_allclose(run.metrics[t]["brivl/temperature"], temperature, rtol=1e-6)
        loss, i2t, t2i = oracle_step(run, apply, t, temperature, TOPK)
        # The float32 temperature (within 5u of the oracle's) moves each logit by 5u |logit| <= 5u / T more.
        atol = sum(oracle_atols(run, apply, t, temperature, TOPK, i2t, t2i)) + 2 * (1 + TOPK) * 2 * 5 * U / temperature
        np.testing.assert_allclose(run.metrics[t]["brivl/loss"], loss, rtol=0, atol=atol, err_msg=f"step {t}")
        fixed, _, _ = oracle_step(run, apply, t, TEMPERATURE, TOPK)
        assert abs(fixed - loss) > max(1e-2, 2 * atol)
