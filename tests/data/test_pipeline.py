"""Training pipeline: batch contract, exact resume, skip-and-count, process sharding, epochs, workers."""
import io
import json
import tarfile
import zlib

import numpy as np
import pytest
from PIL import Image

from clus_jax.data import data_config, embedded, pipeline, records

CONTEXT = 6


def stub_tokenizer(captions: list[str]) -> np.ndarray:
    """Words hashed to ids, padded to CONTEXT; enough to tell captions apart."""
    out = np.zeros((len(captions), CONTEXT), np.int32)
    for i, caption in enumerate(captions):
        for j, word in enumerate(caption.split()[:CONTEXT]):
            out[i, j] = zlib.crc32(word.encode()) % 30_000 + 1
    return out


def _png(value: int, size: int = 12) -> bytes:
    img = np.full((size, size, 3), value % 256, np.uint8)
    img[: size // 2, : size // 3] = (value * 7) % 256  # asymmetric, so crops differ
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "PNG")
    return buf.getvalue()


def _write(tmp_path, n: int, bad: dict[int, dict] | None = None, name: str = "data.array_record") -> str:
    recs: list = []
    for i in range(n):
        rec = {"image": _png(i), "caption": f"item number {i}"}
        if bad and i in bad:
            rec = bad[i]
        recs.append(rec)
    path = str(tmp_path / name)
    records.write_array_record(path, recs)
    return path


def _config(**kw):
    cfg = data_config.default_data_config()
    cfg.update(kw)
    return cfg


def _iterator(cfg, batch=4, seed=0, size=8, **kw):
    return pipeline.create_train_iterator(cfg, tokenizer=stub_tokenizer, image_size=size, local_batch_size=batch,
                                          seed=seed, **kw)


def _rows(batch) -> list[bytes]:
    return [row.tobytes() for row in batch["text"]]


def _assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x["image"], y["image"])
        np.testing.assert_array_equal(x["text"], y["text"])
        assert x["skipped"] == y["skipped"]


def test_batch_contract_synthetic():
    it = _iterator(_config(source="synthetic", synthetic_size=40), batch=5, size=16)
    batch = next(it)
    assert batch["image"].shape == (5, 16, 16, 3) and batch["image"].dtype == np.uint8
    assert batch["text"].shape == (5, CONTEXT) and batch["text"].dtype == np.int32
    assert batch["skipped"].dtype == np.int64 and batch["skipped"].shape == () and batch["skipped"] == 0
    it.close()


def test_declared_image_and_text_fields_give_the_default_batches(tmp_path):
    """fields=None and an explicit {'image', 'text'} declaration are the same pipeline, batch for batch."""
    from clus_jax.data.fields import image_field, text_field

    path = _write(tmp_path, 10, bad={3: {"image": b"broken", "caption": "x"}})
    cfg = _config(source="array_record", path=path, flip=True)
    default = _iterator(cfg, batch=4)
    declared = _iterator(cfg, batch=4, fields={"text": text_field(CONTEXT), "image": image_field(8)})
    for _ in range(6):
        a, b = next(default), next(declared)
        assert list(a) == ["image", "text", "skipped"] and list(b) == ["text", "image", "skipped"]
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
            assert a[key].dtype == b[key].dtype
    default.close()
    declared.close()


def test_epochs_are_fresh_permutations(tmp_path):
    path = _write(tmp_path, 12)
    it = _iterator(_config(source="array_record", path=path, prefetch=0), batch=4)
    rows = [r for _ in range(9) for r in _rows(next(it))]  # three epochs of 12
    epochs = [rows[i * 12:(i + 1) * 12] for i in range(3)]
    expected = set(_rows({"text": stub_tokenizer([f"item number {i}" for i in range(12)])}))
    for e in epochs:
        assert set(e) == expected and len(set(e)) == 12
    assert epochs[0] != epochs[1] and epochs[1] != epochs[2]
    other_seed = _iterator(_config(source="array_record", path=path, prefetch=0), batch=4, seed=1)
    assert [r for _ in range(3) for r in _rows(next(other_seed))] != epochs[0]


@pytest.mark.parametrize("prefetch", [0, 2])
def test_resume_mid_epoch_is_exact(tmp_path, prefetch):
    path = _write(tmp_path, 30, bad={4: {"image": b"broken", "caption": "x"}})
    cfg = _config(source="array_record", path=path, prefetch=prefetch, min_crop_scale=0.3, flip=True)
    reference = _iterator(cfg, batch=4)
    ref = [next(reference) for _ in range(20)]  # crosses epoch boundaries
    run = _iterator(cfg, batch=4)
    head = [next(run) for _ in range(5)]
    state = json.loads(json.dumps(run.get_state()))  # what a checkpoint stores
    run.close()
    restored = _iterator(cfg, batch=4)
    restored.set_state(state)
    tail = [next(restored) for _ in range(15)]
    _assert_batches_equal(head + tail, ref)
    # The same state restored into a second fresh iterator gives the same batches again.
    again = _iterator(cfg, batch=4)
    again.set_state(state)
    _assert_batches_equal([next(again) for _ in range(3)], ref[5:8])


def test_corrupt_records_are_skipped_and_counted_exactly(tmp_path):
    n = 24
    bad = {
        1: {"image": b"\x89PNG\r\n\x1a\n not really", "caption": "bad image bytes"},
        5: {"image": _png(5), "caption": ""},
        6: {"image": _png(6), "caption": "   \t\n"},
        9: {"image": _png(9), "caption": b"\xff\xfe not utf-8"},
        13: {"image": None, "caption": "no image"},
        17: b"\x00 not a record at all",
        20: {"image": _png(20)},  # no caption field
    }
    path = _write(tmp_path, n, bad=bad)
    seed, batch_size = 7, 3
    it = _iterator(_config(source="array_record", path=path, prefetch=0), batch=batch_size, seed=seed)
    position = 0
    valid_rows = set(_rows({"text": stub_tokenizer([f"item number {i}" for i in range(n) if i not in bad])}))
    total_skipped = 0
    for _ in range(20):  # 60 valid examples: about 3.5 epochs
        batch = next(it)
        expected_skipped, taken = 0, 0
        while taken < batch_size:  # replay the stream to know what each batch must have skipped
            _, index = pipeline.shuffled_record_index(position, n, seed)
            position += 1
            if index in bad:
                expected_skipped += 1
            else:
                taken += 1
        assert int(batch["skipped"]) == expected_skipped
        assert set(_rows(batch)) <= valid_rows
        total_skipped += int(batch["skipped"])
    assert it.get_state()["next_index"] == position == 20 * batch_size + total_skipped
    assert total_skipped >= 3 * len(bad)  # every bad record was met in each of the 3 full epochs


def test_all_invalid_data_raises_a_clear_error(tmp_path):
    path = _write(tmp_path, 5, bad={i: {"image": b"x", "caption": "c"} for i in range(5)})
    it = _iterator(_config(source="array_record", path=path, prefetch=0), batch=2)
    with pytest.raises(RuntimeError, match="consecutive records"):
        next(it)


def test_two_processes_split_every_global_batch(tmp_path):
    path = _write(tmp_path, 40)
    cfg = _config(source="array_record", path=path, prefetch=0)
    single = _iterator(cfg, batch=8, seed=3)
    p0 = _iterator(cfg, batch=4, seed=3, process_index=0, process_count=2)
    p1 = _iterator(cfg, batch=4, seed=3, process_index=1, process_count=2)
    for _ in range(12):  # 96 examples: crosses two epoch boundaries
        g, a, b = next(single), next(p0), next(p1)
        ra, rb = _rows(a), _rows(b)
        assert not set(ra) & set(rb)
        assert sorted(ra + rb) == sorted(_rows(g))
        # Same examples get the same crops whatever the process count.
        by_row = {r: img.tobytes() for r, img in zip(_rows(g), g["image"])}
        for r, img in zip(ra + rb, list(a["image"]) + list(b["image"])):
            assert by_row[r] == img.tobytes()
    with pytest.raises(ValueError):
        _iterator(cfg, process_index=2, process_count=2)


def test_tar_source_through_the_pipeline(tmp_path):
    with tarfile.open(tmp_path / "shard-0.tar", "w") as tar:
        for i in range(6):
            for ext, data in (("png", _png(i)), ("txt", f"tar caption {i}".encode())):
                info = tarfile.TarInfo(f"{i:04d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    it = _iterator(_config(source="tar", path=str(tmp_path / "shard-*.tar")), batch=3)
    batch = next(it)
    assert batch["image"].shape == (3, 8, 8, 3) and int(batch["skipped"]) == 0
    it.close()


@pytest.fixture(scope="session")
def embedded_cache(tmp_path_factory):
    cache = str(tmp_path_factory.getbasetemp() / "clus_jax_cache")
    embedded.build_embedded_dataset(cache)
    return cache


def test_embedded_source(embedded_cache):
    it = _iterator(_config(source="embedded", cache_dir=embedded_cache), batch=16, size=32)
    batch = next(it)
    assert batch["image"].shape == (16, 32, 32, 3) and batch["text"].shape == (16, CONTEXT)
    assert int(batch["skipped"]) == 0
    it.close()


@pytest.mark.slow
def test_worker_processes_match_in_process_and_resume(tmp_path):
    path = _write(tmp_path, 20, bad={3: {"image": b"junk", "caption": "x"}})
    base = dict(source="array_record", path=path, prefetch=1)
    reference = _iterator(_config(**base, num_workers=0), batch=4)
    ref = [next(reference) for _ in range(8)]
    workers = _iterator(_config(**base, num_workers=2), batch=4)
    got = [next(workers) for _ in range(3)]
    state = workers.get_state()
    got += [next(workers) for _ in range(5)]
    workers.close()
    _assert_batches_equal(got, ref)
    restored = _iterator(_config(**base, num_workers=2), batch=4)
    restored.set_state(state)
    _assert_batches_equal([next(restored) for _ in range(5)], ref[3:])
    restored.close()
