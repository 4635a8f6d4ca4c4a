"""Fuzz: many damaged records through the pipeline and the trainer. Each record is either used after
conversion or skipped and counted; nothing crashes, and the count is exact (replayed independently)."""
import io
import os
import zlib

import numpy as np
import pytest
from PIL import Image

from clus_jax.data import data_config, pipeline, records



def stub_tokenizer(captions: list[str]) -> np.ndarray:
    """Words hashed to ids (the real tokenizer is tested on its own); 6 tokens per caption."""
    out = np.zeros((len(captions), 6), np.int32)
    for i, caption in enumerate(captions):
        for j, word in enumerate(caption.split()[:6]):
            out[i, j] = zlib.crc32(word.encode()) % 30_000 + 1
    return out


def _encode(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def _rgb(rng, w, h):
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


# kind -> (record factory, usable?)
def _kinds(rng):
    good_png = _encode(_rgb(rng, 20, 16))
    return {
        "ok": (lambda: {"image": _encode(_rgb(rng, 20, 16)), "caption": "a fine picture"}, True),
        "truncated": (lambda: {"image": good_png[: len(good_png) // 2], "caption": "cut off"}, False),
        "random_bytes": (lambda: {"image": rng.bytes(200), "caption": "noise"}, False),
        "zero_size": (lambda: {"image": b"", "caption": "empty file"}, False),
        "one_pixel": (lambda: {"image": _encode(_rgb(rng, 1, 1)), "caption": "a single pixel"}, True),
        "huge": (lambda: {"image": _encode(Image.new("RGB", (3000, 2000), (10, 200, 30))), "caption": "a huge green field"}, True),
        "grayscale": (lambda: {"image": _encode(_rgb(rng, 9, 9).convert("L")), "caption": "grey"}, True),
        "cmyk": (lambda: {"image": _encode(_rgb(rng, 9, 9).convert("CMYK"), "JPEG"), "caption": "printed"}, True),
        "sixteen_bit": (lambda: {"image": _encode(Image.fromarray(rng.integers(0, 65535, (8, 8), dtype=np.uint16))), "caption": "deep"}, True),
        "palette": (lambda: {"image": _encode(_rgb(rng, 9, 9).convert("P")), "caption": "few colours"}, True),
        "rgba": (lambda: {"image": _encode(_rgb(rng, 9, 9).convert("RGBA")), "caption": "see through"}, True),
        "empty_caption": (lambda: {"image": good_png, "caption": ""}, False),
        "whitespace_caption": (lambda: {"image": good_png, "caption": " \t\n "}, False),
        "non_utf8_caption": (lambda: {"image": good_png, "caption": b"\xff\xfe\xfa"}, False),
        "overlong_caption": (lambda: {"image": good_png, "caption": "word " * 5000}, True),
        "missing_image": (lambda: {"caption": "no picture"}, False),
        "missing_caption": (lambda: {"image": good_png}, False),
        "not_a_record": (lambda: rng.bytes(64), False),
    }


@pytest.fixture(scope="module")
def fuzz_file(tmp_path_factory):
    rng = np.random.default_rng(1234)
    kinds = _kinds(rng)
    names = list(kinds)
    # Every kind at least twice, then a seeded random mix.
    chosen = names * 2 + list(rng.choice(names, size=84))
    recs, usable = [], []
    for kind in chosen:
        make, ok = kinds[kind]
        recs.append(make())
        usable.append(ok)
    path = str(tmp_path_factory.mktemp("fuzz") / "fuzz.array_record")
    records.write_array_record(path, recs)
    return path, np.array(usable), chosen


def expected_skips(usable, seed, batch_size, batches):
    """Replays the documented stream order (no pipeline code besides the permutation) to count skips."""
    n, position, out = len(usable), 0, []
    for _ in range(batches):
        skipped = taken = 0
        while taken < batch_size:
            _, index = pipeline.shuffled_record_index(position, n, seed)
            position += 1
            if usable[index]:
                taken += 1
            else:
                skipped += 1
        out.append(skipped)
    return out


def test_every_damaged_record_is_used_or_skipped_and_counted(fuzz_file):
    path, usable, _ = fuzz_file
    cfg = data_config.default_data_config()
    cfg.update(dict(source="array_record", path=path, prefetch=2))
    seed, batch_size, batches = 3, 8, 40  # about 3 epochs of the 120 records
    it = pipeline.create_train_iterator(cfg, tokenizer=stub_tokenizer, image_size=16, local_batch_size=batch_size, seed=seed)
    got = []
    for _ in range(batches):
        batch = next(it)
        assert batch["image"].shape == (batch_size, 16, 16, 3) and batch["image"].dtype == np.uint8
        got.append(int(batch["skipped"]))
    it.close()
    assert got == expected_skips(usable, seed, batch_size, batches)


@pytest.mark.slow
def test_training_on_damaged_data_never_crashes_and_reports_the_count(fuzz_file, tmp_path):
    from clus_jax.config import base as config_base
    from clus_jax.train import loop
    from clus_jax.train.metrics_writer import read_metrics

    path, usable, _ = fuzz_file
    config = config_base.load_config(os.path.join(os.path.dirname(__file__), "..", "..", "configs", "clip.py") + ":steps=6,batch=16")
    config.update_from_flattened_dict({
        "model.image.size": "mu", "model.text.size": "mu", "model.image.image_size": 16,
        "model.text.context_length": 8, "evals.run": "none", "log_every": 1, "checkpoint_every": 0,
        "data.source": "array_record", "data.path": path,
    })
    loop.train_and_evaluate(config, str(tmp_path))
    logged = [r for r in read_metrics(str(tmp_path)) if "data/skipped" in r]
    assert logged[-1]["step"] == 6
    assert logged[-1]["data/skipped"] == sum(expected_skips(usable, config.seed, 16, 6))
    assert all(np.isfinite(r["train/loss"]) for r in logged)
