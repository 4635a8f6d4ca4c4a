"""clus_jax.load on a trained run: its embeddings give back the run's own evaluation figures exactly."""
import io
import os

import jax
import numpy as np
import pytest
from PIL import Image

import clus_jax
from clus_jax import inference
from clus_jax.config import run_config
from clus_jax.data import embedded, embedded_eval, transforms
from clus_jax.data.tokenizers import create_tokenizer
from clus_jax.evaluate.runner import evaluate
from clus_jax.train import loop
from clus_jax.train.checkpoint import Checkpointer
from clus_jax.train.metrics_writer import read_metrics

import tolerances  # registered by tests/conftest.py
import train_helpers as helpers  # registered by tests/conftest.py

MODEL_ENTRIES = {"image", "text", "image_proj", "text_proj", "logit_scale"}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny CLIP trained 4 steps on the embedded data, evaluated at the end (about half a minute)."""
    workdir = str(tmp_path_factory.mktemp("run"))
    config = helpers.tiny_config("clip", total_steps=4, log_every=2, checkpoint_every=0)
    config.data.source = "embedded"
    config.evals.run = "embedded"
    config.evals.batch_size = 64
    config.model.text.vocab_size = 49408  # the CLIP tokenizer's ids
    loop.train_and_evaluate(config, workdir)
    return workdir


@pytest.fixture(scope="module")
def model(run):
    return clus_jax.load(run)


@pytest.fixture(scope="module")
def eval_sets(model):
    return embedded_eval.load_eval_sets(image_size=model.image_size)


def test_the_trainer_writes_config_json(run):
    assert os.path.isfile(os.path.join(run, "config.json"))
    config = run_config.load_run_config(run)
    assert config.total_steps == 4 and config.data.source == "embedded"


@pytest.mark.slow
def test_embeddings_give_the_runs_final_evaluation_figures(run, model, eval_sets):
    final = [r for r in read_metrics(run) if "zeroshot/easyvqa/top1" in r][-1]
    figures = evaluate(eval_sets, model.encode_image, model.encode_text)
    assert figures and {k.split("/")[0] for k in figures} == {"zeroshot", "retrieval", "probe", "cluster"}
    assert figures == {k: final[k] for k in figures}  # exact: the evaluation's own encoders, the same programs


def test_only_the_models_parameters_are_read(run, model, tmp_path):
    assert set(model.params) == MODEL_ENTRIES and model.step == 4
    # A checkpoint that also holds an objective's parameters, optimizer moments and objective state.
    params = jax.device_get(model.params)
    state = {"step": np.int32(1), "params": {**params, "swap": {"bank_0": np.ones((8, 32), np.float32)}},
             "opt_state": {"mu": jax.tree.map(np.zeros_like, params)}, "objective_states": {"swap": {"queue": np.ones(3)}}}
    other = tmp_path / "other"
    ckpt = Checkpointer(str(other / "checkpoints"), async_save=False)
    ckpt.save(1, state, force=True)
    ckpt.close()
    run_config.save_run_config(str(other), model.config)
    loaded = clus_jax.load(str(other / "checkpoints" / "1"))
    assert set(loaded.params) == MODEL_ENTRIES and loaded.step == 1
    images = np.random.default_rng(0).integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    np.testing.assert_array_equal(loaded.encode_image(images), model.encode_image(images))  # same program, params

    wrong = model.config.copy_and_resolve_references()
    wrong.model.embed_dim = 48
    run_config.save_run_config(str(other), wrong)
    with pytest.raises(ValueError, match="does not match config.json's model"):
        clus_jax.load(str(other))


def test_images_of_any_size_pil_images_paths_and_bytes_are_prepared_as_the_evaluation_does(model, eval_sets, tmp_path):
    heldout = next(s for s in eval_sets if s.name == "emoji_heldout")  # one image per distinct picture
    records, seen = [], set()
    for r in embedded.read_split(embedded.build_embedded_dataset(), "twemoji_heldout"):
        if r["sha1"] not in seen and len(records) < 5:
            seen.add(r["sha1"])
            records.append(r)
    png = [r["image"] for r in records]  # 72x72 RGBA PNGs, prepared at 16x16 by the evaluation
    expected = model.encode_image(heldout.images[:5])
    paths = []
    for i, data in enumerate(png):
        paths.append(tmp_path / f"{i}.png")
        paths[-1].write_bytes(data)
    pil = [Image.open(io.BytesIO(data)) for data in png]
    arrays = np.stack([np.asarray(img.convert("RGBA")) for img in pil])  # [5, 72, 72, 4]
    for inputs in (png, pil, paths, [str(p) for p in paths], arrays):
        np.testing.assert_array_equal(model.prepare_images(inputs), heldout.images[:5])
        np.testing.assert_array_equal(model.encode_image(inputs), expected)  # same pixels, same program: bitwise

    wide = np.random.default_rng(1).integers(0, 256, (2, 30, 50, 3), dtype=np.uint8)  # not square
    np.testing.assert_array_equal(model.prepare_images(wide), np.stack([transforms.center_crop(w, 16) for w in wide]))
    with pytest.raises(ValueError, match="image 1"):
        model.encode_image([png[0], b"not an image"])
    with pytest.raises(TypeError, match="list"):
        model.encode_image(paths[0])


def test_any_number_of_inputs_gives_the_same_rows(model, eval_sets):
    images = eval_sets[0].images[:131]  # two full batches of 64 and a padded one
    texts = [f"a {c}" for c in eval_sets[0].classnames] * 6
    all_images, all_texts = model.encode_image(images), model.encode_text(texts)
    for emb in (all_images, all_texts):
        assert emb.dtype == np.float32 and emb.shape[1] == model.embed_dim
        np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=0,
                                   atol=tolerances.unit_norm_atol(model.embed_dim))  # float32 x / |x|, float32 |.|
    # Bitwise: every call runs the same fixed-size batch program, and a row's arithmetic ignores the others.
    for n in (0, 1, 63, 65):
        assert model.encode_image(images[:n]).shape == (n, model.embed_dim)
        np.testing.assert_array_equal(model.encode_image(images[:n]), all_images[:n])
        np.testing.assert_array_equal(model.encode_text(texts[:n]), all_texts[:n])
    assert model.encode_image([]).shape == model.encode_text([]).shape == (0, model.embed_dim)
    with pytest.raises(TypeError, match="list"):
        model.encode_text("a red circle")


def test_tokenize_is_the_runs_tokenizer(model):
    texts = ["a red circle", "an emoji of a cat"]
    np.testing.assert_array_equal(model.tokenize(texts), create_tokenizer("clip", 8)(texts))


def test_a_run_without_a_finished_checkpoint_is_named(tmp_path):
    run_config.save_run_config(str(tmp_path), helpers.tiny_config("clip"))
    with pytest.raises(FileNotFoundError, match="checkpoint"):
        inference.load(str(tmp_path))


def test_a_step_is_picked_by_number(run):
    assert clus_jax.load(run, step=4).step == 4
    with pytest.raises(FileNotFoundError, match="no checkpoint step 3"):
        clus_jax.load(run, step=3)
