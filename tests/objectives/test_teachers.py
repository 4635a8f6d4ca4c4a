"""Frozen teachers with towers of their own (objectives/teachers.py): their parameters, images resized to their
size, and sources read through an added reader, loaded inside a jitted init."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clus_jax.models.towers import build_model
from clus_jax.objectives import teachers
from clus_jax.parallel.partitioning import is_box

import train_helpers as helpers  # registered by tests/conftest.py


def teacher_model(width=64, depth=2, embed_dim=48, image_size=24):
    """A tiny config.model of other towers than train_helpers.tiny_config's student."""
    model = helpers.tiny_config().model.copy_and_resolve_references()
    for tower in ("image", "text"):
        model[tower].update(dict(width=width, depth=depth, heads=2, mlp_dim=2 * width))
    model.image.image_size = image_size
    model.embed_dim = embed_dim
    return model


def test_resize_keeps_uint8_and_a_tower_normalises_it():
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.integers(0, 256, (2, 16, 16, 3), dtype=np.uint8))
    assert teachers.resize_images(images, 16) is images
    bigger = teachers.resize_images(images, 24)
    assert bigger.shape == (2, 24, 24, 3) and bigger.dtype == jnp.uint8
    flat = jnp.full((1, 16, 16, 3), 200, jnp.uint8)  # a constant image stays that constant
    np.testing.assert_array_equal(teachers.resize_images(flat, 24), 200)
    floats = teachers.resize_images(images.astype(jnp.float32), 8)
    assert floats.dtype == jnp.float32 and floats.shape == (2, 8, 8, 3)


def test_towers_of_their_own_run_on_the_students_batch():
    """Another width, depth, embedding width and image size than the student's batch holds."""
    model = teacher_model()
    shapes = teachers.tower_shapes(model)
    assert shapes["image_proj"]["kernel"].shape == (64, 48)
    rng = np.random.default_rng(1)
    params = jax.tree.map(lambda s: rng.normal(0, 0.1, s.shape).astype(s.dtype), shapes)
    batch = helpers.random_batches(helpers.tiny_config(), 1)[0]  # 16 px images, 8 tokens
    out = jax.jit(lambda p, b: teachers.apply_towers(model, p, b))(params, batch)
    assert out["image_emb"].shape == (16, 48) and out["text_emb"].shape == (16, 48)
    # The same as the towers on images resized beforehand.
    resized = teachers.resize_images(jnp.asarray(batch["image"]), 24)
    want = jax.jit(lambda p, i, t: build_model(model).apply({"params": p}, i, t))(params, resized, batch["text"])
    np.testing.assert_allclose(out["image_emb"], want["image_emb"], rtol=0, atol=1e-6)
    np.testing.assert_allclose(out["text_emb"], want["text_emb"], rtol=0, atol=1e-6)


def test_a_source_read_by_an_added_reader_loads_inside_jit():
    model = teacher_model()
    saved = jax.tree.map(lambda s: np.full(s.shape, 0.25, s.dtype), teachers.tower_shapes(model))
    calls = []

    def read(path, model_file):
        calls.append((path, model_file))
        return {**saved, "unused": np.zeros(3)}

    teachers.add_reader("test_source", teachers.Reader(
        is_source=lambda path: path.endswith(".test"), model_config=lambda path, model_file: model, read_params=read))
    try:
        assert teachers.reader_for("a/run") is None and teachers.reader_for("w.test") is not None

        def load(path, towers=model, model_file=""):  # inside a jitted init, as the train state's is built
            like = teachers.init_towers(towers, jax.random.PRNGKey(0))
            return teachers.unboxed(teachers.restore_in_init(path, None, like, model_file=model_file))

        loaded = jax.jit(lambda: load("w.test", model_file="m.json"))()
        assert calls == [("w.test", "m.json")]
        for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(saved)):
            np.testing.assert_array_equal(a, b)
        # The boxes stay, so the loaded values are placed like the parameters they stand for.
        boxed = jax.eval_shape(lambda: teachers.restore_in_init(
            "w.test", None, teachers.init_towers(model, jax.random.PRNGKey(0))))
        assert any(is_box(x) for x in jax.tree.leaves(boxed, is_leaf=is_box))
        # A source whose shapes are not the model's fails naming the parameter.
        with pytest.raises(Exception, match=r"does not match the model.*image"):
            jax.block_until_ready(jax.jit(lambda: load("w.test", teacher_model(width=32)))())
    finally:
        teachers._READERS.pop("test_source")
