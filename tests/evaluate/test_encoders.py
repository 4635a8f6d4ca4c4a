"""The in-loop encoders (``clus_jax.evaluate.encoders.make_encoders``): padded fixed-size batches sharded over
the mesh, padding rows dropped, order kept, and each process feeding its own contiguous rows.

The reference is the model applied to one example at a time, on one device.
"""
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clus_jax.models.towers import build_model
from clus_jax.parallel import mesh as mesh_lib
from clus_jax.parallel import multihost, partitioning
from clus_jax.evaluate import encoders

import tolerances  # registered by tests/conftest.py
import train_helpers as helpers  # registered by tests/conftest.py

BATCH = 16


def setup(mesh_config, devices=None):
    """The tiny CLIP config, its model, a mesh of ``devices`` (default: all), the rules, the parameters'
    shardings and parameters (fixed: key 0) placed by them."""
    config = helpers.tiny_config("clip")
    model = build_model(config.model)
    mesh = mesh_lib.create_mesh(mesh_config, jax.devices() if devices is None else devices)
    rules = [tuple(r) for r in config.logical_axis_rules]
    size, length = int(config.model.image.image_size), int(config.model.text.context_length)
    images, tokens = jnp.zeros((1, size, size, 3), jnp.uint8), jnp.ones((1, length), jnp.int32)
    boxed = jax.jit(model.init)(jax.random.key(0), images, tokens)["params"]  # one compilation, not one per op
    shardings = partitioning.shardings_for(boxed, mesh, rules)
    params = jax.device_put(partitioning.unbox(boxed), shardings)
    return config, model, mesh, rules, shardings, params


def tokenizer_for(config):
    """Texts are space-separated token ids ('3 17 5'), zero padded: the test chooses every id."""
    length = int(config.model.text.context_length)

    def tokenize(texts):
        out = np.zeros((len(texts), length), np.int32)
        for i, text in enumerate(texts):
            ids = [int(t) for t in text.split()]
            out[i, : len(ids)] = ids
        return out

    return tokenize


def examples(config, n, seed=0):
    rng = np.random.default_rng(seed)
    size, length, vocab = int(config.model.image.image_size), int(config.model.text.context_length), int(config.model.text.vocab_size)
    images = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    texts = [" ".join(str(t) for t in rng.integers(1, vocab, int(rng.integers(2, length + 1)))) for _ in range(n)]
    return images, texts


def one_at_a_time(model, params, method, inputs):
    params = jax.device_get(params)
    fn = jax.jit(lambda p, x: model.apply({"params": p}, x, method=method))
    return np.concatenate([np.asarray(fn(params, x[None])) for x in inputs])


@pytest.mark.parametrize("mesh_config", [{"data": 8}, {"data": 2, "tensor": 4}], ids=["data8", "data2_tensor4"])
def test_encoders_equal_the_model_per_example_in_order(mesh_config):
    config, model, mesh, rules, shardings, params = setup(mesh_config)
    tokenize = tokenizer_for(config)
    bind = encoders.make_encoders(model, mesh, rules, shardings, tokenize, BATCH)
    encode_images, encode_texts, *_ = bind(params)
    images, texts = examples(config, 2 * BATCH + 1)
    want_images = one_at_a_time(model, params, "encode_image", images)
    want_texts = one_at_a_time(model, params, "encode_text", tokenize(texts))
    # Batches of 16 on 8 devices (heads and MLP split over 'tensor' on the second mesh) against one example on
    # one device: the same sums, blocked and split differently. The 'mu' towers: MLP 256 the longest reduction,
    # 2 blocks + embedding and head (tolerances.network_atol).
    atol = {id(w): tolerances.network_atol(256, float(np.max(np.abs(w))), 3) for w in (want_images, want_texts)}
    for want in (want_images, want_texts):  # neighbours differ far beyond the tolerance: a reordering would show
        assert np.abs(want[1:] - want[:-1]).max(axis=1).min() > 10 * atol[id(want)]
    for n in (1, 7, 8, BATCH, BATCH + 1, 2 * BATCH + 1):
        got = encode_images(images[:n])
        assert got.shape == (n, want_images.shape[1]), n
        np.testing.assert_allclose(got, want_images[:n], rtol=0, atol=atol[id(want_images)], err_msg=f"images, n={n}")
        got = encode_texts(texts[:n])
        assert got.shape == (n, want_texts.shape[1]), n
        np.testing.assert_allclose(got, want_texts[:n], rtol=0, atol=atol[id(want_texts)], err_msg=f"texts, n={n}")


class FakeProcess:
    """``jax`` as one of ``count`` processes (number ``index``) sees it; everything else is the real jax.

    ``make_array_from_process_local_data`` records the rows this process feeds and stands in the same rows
    for the other processes, so the encoders run; their values are not what this fake checks.
    """

    def __init__(self, count, index):
        self.count, self.index, self.fed = count, index, []

    def process_count(self):
        return self.count

    def process_index(self):
        return self.index

    def make_array_from_process_local_data(self, sharding, local, global_shape=None):
        self.fed.append(np.asarray(local))
        return jax.make_array_from_process_local_data(sharding, np.concatenate([local] * self.count), global_shape)

    def __getattr__(self, name):
        return getattr(jax, name)


@pytest.mark.parametrize("count", [2, 4])
def test_process_slice_gives_each_process_its_contiguous_share(monkeypatch, count):
    n = 24
    shares = []
    for index in range(count):
        monkeypatch.setattr(multihost, "jax", types.SimpleNamespace(process_count=lambda: count, process_index=lambda i=index: i))
        shares.append(np.arange(n)[multihost.process_slice(n)])
    assert all(len(s) == n // count for s in shares)
    np.testing.assert_array_equal(np.concatenate(shares), np.arange(n))  # in process order, disjoint, complete


@pytest.mark.parametrize("count", [2, 4])
def test_each_process_feeds_its_rows_of_every_padded_batch(monkeypatch, count):
    config, model, mesh, rules, shardings, params = setup({"data": 8})
    tokenize = tokenizer_for(config)
    images, _ = examples(config, 2 * BATCH + 3)
    per_batch = 8 * count  # a batch is a multiple of (data-parallel size) x (process count)
    batch = max(per_batch, BATCH // per_batch * per_batch)
    fed = []
    for index in range(count):
        fake = FakeProcess(count, index)
        monkeypatch.setattr(encoders, "jax", fake)
        monkeypatch.setattr(multihost, "jax", fake)
        encode_images, *_ = encoders.make_encoders(model, mesh, rules, shardings, tokenize, BATCH)(params)
        assert len(encode_images(images)) == len(images)
        fed.append(fake.fed)
    padded = -(-len(images) // batch) * batch
    expected = np.concatenate([images, np.repeat(images[-1:], padded - len(images), axis=0)])  # last row repeated
    assert all(len(f) == padded // batch for f in fed)  # every process runs the same number of batches
    assert all(len(rows) == batch // count for f in fed for rows in f)
    # Batch b is process 0's rows, then process 1's, ...: together the padded data, in order.
    batches = [np.concatenate([fed[p][b] for p in range(count)]) for b in range(padded // batch)]
    np.testing.assert_array_equal(np.concatenate(batches), expected)
