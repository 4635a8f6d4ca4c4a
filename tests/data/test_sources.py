"""ArrayRecord, tar-shard, TFDS and synthetic sources: round trips, random access, pickling, errors."""
import importlib.util
import io
import json
import os
import pickle
import struct
import tarfile

import msgpack
import numpy as np
import pytest
from PIL import Image

from clus_jax.data import eval_writers, records, sources, synthetic, transforms


def _png(value: int, size: int = 8) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((size, size, 3), value, np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _jpg(value: int, size: int = 8) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((size, size, 3), value, np.uint8)).save(buf, "JPEG", quality=95)
    return buf.getvalue()


# ------------------------------------------------------------------------------ tf.Example writer
def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _len_field(field: int, payload: bytes) -> bytes:
    return _varint(field << 3 | 2) + _varint(len(payload)) + payload


def _tf_example(features: dict) -> bytes:
    entries = b""
    for key, values in features.items():
        if isinstance(values[0], bytes):
            feature = _len_field(1, b"".join(_len_field(1, v) for v in values))
        elif isinstance(values[0], float):
            feature = _len_field(2, _len_field(1, struct.pack(f"<{len(values)}f", *values)))
        else:
            packed = b"".join(_varint(v & ((1 << 64) - 1)) for v in values)
            feature = _len_field(3, _len_field(1, packed))
        entries += _len_field(1, _len_field(1, key.encode()) + _len_field(2, feature))
    return _len_field(1, entries)


# ---------------------------------------------------------------------------------- ArrayRecord
def test_project_record_round_trip(tmp_path):
    recs = [{"image": _png(i * 10), "caption": f"item {i}", "label": i, "concept": "1F600", "style": "twemoji",
             "source": "test", "nested": [1, 2], "none": None} for i in range(7)]
    path = str(tmp_path / "train.array_record")
    assert records.write_array_record(path, recs) == 7
    assert os.listdir(tmp_path) == ["train.array_record"]  # no temporary file left beside it
    assert records.read_array_record(path) == recs
    src = sources.ArrayRecordSource(path)
    assert len(src) == 7
    for i in [6, 0, 3]:  # random access
        rec = src[i]
        assert rec["caption"] == f"item {i}" and rec["label"] == i and rec["style"] == "twemoji"
        assert transforms.decode_image(rec["image"])[0, 0, 0] == i * 10
    clone = pickle.loads(pickle.dumps(src))
    assert clone[5]["caption"] == "item 5"


def test_generic_records_with_custom_keys(tmp_path):
    path = str(tmp_path / "generic-00000.array_record")
    raw = [msgpack.packb({"jpg": _jpg(200), "txt": "a msgpack pair"}, use_bin_type=True),
           _tf_example({"img": [_png(50)], "text": [b"a tf example pair"], "label": [-3], "score": [0.5]})]
    records.write_array_record(path, raw)
    decoded = records.decode_record(raw[1])
    assert decoded["label"] == [-3] and decoded["score"] == [0.5] and decoded["text"] == [b"a tf example pair"]
    mp = sources.ArrayRecordSource(str(tmp_path / "generic-*.array_record"), image_key="jpg", caption_key="txt")
    assert mp[0]["caption"] == "a msgpack pair" and mp[0]["image"][:2] == b"\xff\xd8"
    tf = sources.ArrayRecordSource(path, image_key="img", caption_key="text")
    assert transforms.clean_caption(tf[1]["caption"]) == "a tf example pair"
    assert transforms.decode_image(tf[1]["image"])[0, 0, 0] == 50
    assert tf[0]["image"] is None  # the msgpack record has no 'img' field: left for the pipeline to skip


def test_decode_record_rejects_garbage():
    with pytest.raises(ValueError):
        records.decode_record(b"\x00\x01garbage")
    with pytest.raises(ValueError):
        records.decode_record(b"\x81\xa1")  # truncated msgpack map


def test_missing_and_unreadable_paths_are_named(tmp_path):
    missing = str(tmp_path / "nowhere" / "*.array_record")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        sources.ArrayRecordSource(missing)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        sources.TarShardSource(str(tmp_path / "nowhere.tar"))
    bad = tmp_path / "bad.array_record"
    bad.write_bytes(b"not an array record")
    with pytest.raises(OSError, match="bad.array_record"):
        sources.ArrayRecordSource(str(bad))


# ------------------------------------------------------------------------------------------- tar
def _write_tar(path, samples, compression: str = ""):
    with tarfile.open(path, "w" + (f":{compression}" if compression else "")) as tar:
        for name, data in samples:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_tar_shards_random_access(tmp_path):
    _write_tar(tmp_path / "shard-000.tar", [
        ("a/000.png", _png(10)), ("a/000.txt", b"first caption"),
        ("a/001.jpg", _jpg(100)), ("a/001.json", json.dumps({"caption": "from json", "w": 8}).encode()),
        ("a/002.png", _png(30)),  # no caption
        ("a/003.txt", b"no image"),
        ("a/004.webp", b""), ("a/004.cls", b"3"),  # nothing usable besides the image member
    ])
    _write_tar(tmp_path / "shard-001.tar", [
        (f"b/{i:03d}.{ext}", data) for i in range(5)
        for ext, data in (("png", _png(i * 40)), ("caption", f"shard two {i}".encode()))])
    src = sources.TarShardSource(str(tmp_path / "shard-*.tar"))
    assert len(src) == 10
    assert [src.key(i) for i in range(5)] == [f"a/00{i}" for i in range(5)]
    assert src[0]["caption"] == b"first caption" and transforms.decode_image(src[0]["image"])[0, 0, 0] == 10
    assert src[1]["caption"] == "from json" and src[1]["image"][:2] == b"\xff\xd8"
    assert src[2]["caption"] is None and src[3]["image"] is None
    for i in [9, 5, 7]:
        assert src[i]["caption"] == f"shard two {i - 5}".encode()
        assert transforms.decode_image(src[i]["image"])[0, 0, 0] == (i - 5) * 40
    clone = pickle.loads(pickle.dumps(src))
    assert clone[8]["caption"] == b"shard two 3"
    only_jpg = sources.TarShardSource(str(tmp_path / "shard-000.tar"), image_key="jpg", caption_key="json")
    assert len(only_jpg) == 1 and only_jpg[0]["caption"] == "from json"


def test_compressed_tar_is_rejected_with_path(tmp_path):
    _write_tar(tmp_path / "shard.tar.gz", [("x.png", _png(1)), ("x.txt", b"c")], compression="gz")
    with pytest.raises(OSError, match="shard.tar.gz"):
        sources.TarShardSource(str(tmp_path / "shard.tar.gz"))


# ------------------------------------------------------------------------------------------ tfds
_HAS_TFDS = importlib.util.find_spec("tensorflow_datasets") is not None


def test_tfds_missing_package_message(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # what an environment without it gives
    with pytest.raises(ImportError, match="tensorflow-datasets"):
        sources.TfdsSource("tiny_pairs", data_dir="/nonexistent")


@pytest.mark.skipif(not _HAS_TFDS, reason="tensorflow-datasets is not installed (it is in the test extra)")
def test_tfds_data_source(tmp_path):
    import tensorflow_datasets as tfds

    features = tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(8, 8, 3)), "caption": tfds.features.Text(),
        "labels": tfds.features.Tensor(shape=(2,), dtype=np.int32)})
    # Encoded images: encoding arrays would need TensorFlow.
    examples = [{"image": _png(i * 20), "caption": f"pair {i}", "labels": np.asarray([i, -i], np.int32)}
                for i in range(6)]
    data_dir = str(tmp_path / "tfds")
    eval_writers.write_tfds_examples(data_dir, "tiny_pairs", examples, features=features, split="train")
    src = sources.TfdsSource("tiny_pairs", split="train", data_dir=data_dir)
    assert len(src) == 6
    captions = sorted(transforms.clean_caption(src[i]["caption"]) for i in range(6))
    assert captions == [f"pair {i}" for i in range(6)]
    clone = pickle.loads(pickle.dumps(src))
    assert transforms.decode_image(clone[0]["image"]).shape == (8, 8, 3)
    with pytest.raises(FileNotFoundError, match="missing_pairs"):
        sources.TfdsSource("missing_pairs", data_dir=data_dir)

    from clus_jax.data import data_config, pipeline

    config = data_config.default_data_config()
    config.update({"source": "tfds", "path": "tiny_pairs", "tfds_data_dir": data_dir})
    it = pipeline.create_train_iterator(config, tokenizer=lambda caps: np.ones((len(caps), 4), np.int32),
                                        image_size=8, local_batch_size=4, seed=0)
    batch = next(it)
    assert batch["image"].shape == (4, 8, 8, 3) and int(batch["skipped"]) == 0
    it.close()

    # A declared extra field comes from the TFDS feature of that name, with its own image.
    from clus_jax.data.fields import FieldSpec, image_field

    fields = {"image": image_field(8), "labels": FieldSpec((2,), "int32")}
    it = pipeline.create_train_iterator(config, tokenizer=None, image_size=8, local_batch_size=6, seed=0,
                                        fields=fields)
    batch = next(it)
    assert sorted(batch) == ["image", "labels", "skipped"]
    pixel_index = batch["image"][:, 4, 4, 0].astype(int) // 20  # images are flat grey of value 20 * i
    np.testing.assert_array_equal(batch["labels"], np.stack([pixel_index, -pixel_index], axis=1))
    assert sorted(pixel_index.tolist()) == list(range(6))
    it.close()


# ------------------------------------------------------------------------------------ synthetic
def test_synthetic_source_is_deterministic():
    a, b = synthetic.SyntheticSource(50, seed=3), synthetic.SyntheticSource(50, seed=3)
    assert len(a) == 50
    for i in [0, 17, 49]:
        np.testing.assert_array_equal(a[i]["image"], b[i]["image"])
        assert a[i]["caption"] == b[i]["caption"] and a[i]["image"].shape == (64, 64, 3)
    assert synthetic.SyntheticSource(50, seed=4)[0]["caption"] != a[0]["caption"] or not np.array_equal(
        synthetic.SyntheticSource(50, seed=4)[0]["image"], a[0]["image"])
    with pytest.raises(IndexError):
        a[50]
    assert pickle.loads(pickle.dumps(a))[17]["caption"] == a[17]["caption"]


def test_make_source_dispatch(tmp_path):
    path = str(tmp_path / "x.array_record")
    records.write_array_record(path, [{"image": _png(1), "caption": "c"}])
    assert len(sources.make_source({"source": "array_record", "path": path})) == 1
    assert len(sources.make_source({"source": "synthetic", "synthetic_size": 12})) == 12
    with pytest.raises(ValueError, match="path"):
        sources.make_source({"source": "tar", "path": None})
    with pytest.raises(ValueError, match="unknown"):
        sources.make_source({"source": "parquet"})
