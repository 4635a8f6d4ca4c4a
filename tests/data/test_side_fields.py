"""Side files and declared batch fields: each example's field arrives with its own image (shuffled, resumed,
two processes, subsets), image-only and text-only pipelines, and the errors and skips of bad fields.

The source's images are flat colours that encode their record index, so every check compares a batch
field with the record the image came from.
"""
import io
import json
import pickle

import ml_collections
import numpy as np
import pytest
from PIL import Image

from clus_jax.data import data_config, pipeline, records, side_fields, sources
from clus_jax.data.fields import FieldSpec, image_field, text_field

N = 30
SIZE = 8
CONTEXT = 4
LABELS = FieldSpec((8,), "int32")


def _png_of_index(i: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((12, 10, 3), (i % 256, i // 256, 77), np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def index_of(images: np.ndarray) -> np.ndarray:
    """Record index of each image of a batch (crops and resizes keep a flat colour)."""
    centre = images[:, SIZE // 2, SIZE // 2].astype(np.int64)
    assert (centre[:, 2] == 77).all()
    return centre[:, 0] + 256 * centre[:, 1]


def index_tokenizer(captions: list[str]) -> np.ndarray:
    """'item i' -> [i + 1, 0, ...]: the text tells which record the caption came from."""
    out = np.zeros((len(captions), CONTEXT), np.int32)
    for row, caption in zip(out, captions):
        row[0] = int(caption.split()[-1]) + 1
    return out


def write_source(tmp_path, n: int = N, record=None, name: str = "data.array_record") -> str:
    record = record or (lambda i: {"image": _png_of_index(i), "caption": f"item {i}"})
    path = str(tmp_path / name)
    records.write_array_record(path, [record(i) for i in range(n)])
    return path


@pytest.fixture
def labelled(tmp_path):
    """(data config, labels [N, 8]) with the labels in a sharded side file keyed by record index."""
    labels = np.random.default_rng(0).integers(0, 1000, (N, 8)).astype(np.int32)
    side = side_fields.write_side_file(tmp_path / "labels", {"cluster_labels": labels}, shard_size=7)
    config = data_config.default_data_config()
    config.update({"source": "array_record", "path": write_source(tmp_path), "prefetch": 2,
                   "min_crop_scale": 0.3, "flip": True})
    config.side_fields = {"cluster_labels": side}
    return config, labels


FIELDS = {"image": image_field(SIZE), "text": text_field(CONTEXT), "cluster_labels": LABELS}


def make_iterator(config, fields=FIELDS, batch=4, seed=0, tokenizer=index_tokenizer, **kw):
    return pipeline.create_train_iterator(config, tokenizer=tokenizer, image_size=SIZE, local_batch_size=batch,
                                          seed=seed, fields=fields, **kw)


def assert_consistent(batch, labels, keys=FIELDS):
    """Keys exactly as declared; every example's label and text belong to its image's record."""
    assert list(batch) == [*keys, "skipped"]
    idx = index_of(batch["image"])
    np.testing.assert_array_equal(batch["cluster_labels"], labels[idx])
    if "text" in batch:
        np.testing.assert_array_equal(batch["text"][:, 0], idx + 1)
    return idx


def assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert list(x) == list(y)
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])


# ---------------------------------------------------------------------------------------- file format


def test_writer_and_reader_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    arrays = {"image_emb": rng.normal(size=(23, 5)).astype(np.float32), "index": np.arange(23, dtype=np.int64),
              "label": rng.integers(0, 9, 23).astype(np.int32)}
    path = side_fields.write_side_file(tmp_path / "emb", arrays, shard_size=10)
    manifest = json.loads((tmp_path / "emb" / "manifest.json").read_text())
    assert manifest["num_records"] == 23
    assert manifest["fields"]["image_emb"] == {"shape": [5], "dtype": "float32"}
    assert [(s["start"], s["end"]) for s in manifest["shards"]] == [(0, 10), (10, 20), (20, 23)]
    assert manifest["shards"][1]["files"]["label"] == "label-00001.npy"
    np.testing.assert_array_equal(np.load(tmp_path / "emb" / "label-00002.npy"), arrays["label"][20:])

    for name, array in arrays.items():
        reader = side_fields.SideFieldReader(path, field=name)
        assert len(reader) == 23 and reader.spec == FieldSpec(array.shape[1:], array.dtype)
        for i in [22, 0, 10, 9, 15]:  # random access across shards
            np.testing.assert_array_equal(reader[i], array[i])
        clone = pickle.loads(pickle.dumps(reader))
        np.testing.assert_array_equal(clone[19], array[19])
        np.testing.assert_array_equal(np.concatenate(list(reader.chunks())), array)
    with pytest.raises(IndexError):
        side_fields.SideFieldReader(path, field="label")[23]
    with pytest.raises(ValueError, match="image_emb"):  # two fields besides index: the name is needed
        side_fields.SideFieldReader(path, field="cluster_labels")

    # The only field (not counting 'index') is read whatever the entry's name; a .npy is format (a).
    only = side_fields.write_side_file(tmp_path / "only", {"labels": arrays["label"], "index": arrays["index"]})
    np.testing.assert_array_equal(side_fields.SideFieldReader(only, field="cluster_labels")[4], arrays["label"][4])
    np.save(tmp_path / "plain.npy", arrays["image_emb"])
    plain = side_fields.SideFieldReader(tmp_path / "plain.npy", field="anything")
    assert len(plain) == 23 and plain.spec == FieldSpec((5,), "float32")
    np.testing.assert_array_equal(plain[7], arrays["image_emb"][7])


def test_incremental_writer_matches_one_write(tmp_path):
    rng = np.random.default_rng(2)
    emb = rng.normal(size=(50, 3)).astype(np.float32)
    with side_fields.SideFileWriter(tmp_path / "inc", {"emb": FieldSpec((3,), "float32")}, shard_size=8) as writer:
        for lo, hi in [(0, 3), (3, 20), (20, 21), (21, 50)]:
            writer.write({"emb": emb[lo:hi]})
    assert sorted(p.name for p in (tmp_path / "inc").iterdir()) == ["emb-00000.npy", "emb-00001.npy", "emb-00002.npy",
                                                                     "emb-00003.npy", "emb-00004.npy",
                                                                     "emb-00005.npy", "emb-00006.npy",
                                                                     side_fields.MANIFEST]  # no temporary file left
    np.testing.assert_array_equal(np.concatenate(list(side_fields.SideFieldReader(tmp_path / "inc").chunks())), emb)
    with pytest.raises(FileExistsError, match="inc"):
        side_fields.write_side_file(tmp_path / "inc", {"emb": emb})
    side_fields.write_side_file(tmp_path / "inc", {"emb": emb[:5]}, overwrite=True)
    assert len(side_fields.SideFieldReader(tmp_path / "inc")) == 5
    writer = side_fields.SideFileWriter(tmp_path / "bad", {"a": FieldSpec((), "int32"), "b": FieldSpec((2,), "int32")})
    with pytest.raises(ValueError, match="rows"):
        writer.write({"a": np.zeros(3, np.int32), "b": np.zeros((4, 2), np.int32)})
    with pytest.raises(ValueError, match="'b'"):
        writer.write({"a": np.zeros(3, np.int32), "b": np.zeros((3, 5), np.int32)})


def test_writing_shard_by_shard_makes_the_side_file_that_appending_makes(tmp_path):
    """Two processes that each write their own shards (as python -m clus_jax.embed does), the second finishing
    first, give the same files and manifest as one writer that appends the rows in order (as cluster --topk
    does); a re-run sees every shard and writes the manifest again."""
    rng = np.random.default_rng(3)
    arrays = {"emb": rng.normal(size=(23, 3)).astype(np.float32), "index": np.arange(23, dtype=np.int64),
              "valid": rng.random(23) > 0.3}
    specs = {name: FieldSpec(a.shape[1:], a.dtype) for name, a in arrays.items()}
    appended = side_fields.write_side_file(tmp_path / "appended", arrays, shard_size=10)
    ranges = side_fields.shard_ranges(23, 10)
    assert ranges == [(0, 10), (10, 20), (20, 23)]
    for process in (1, 0):
        writer = side_fields.SideFileWriter(tmp_path / "sharded", specs, shard_size=10, num_records=23)
        for k in side_fields.process_shards(len(ranges), process, 2):
            writer.write_shard(k, {name: a[slice(*ranges[k])] for name, a in arrays.items()})
        assert writer.close() == (process == 0)  # the manifest comes with the last shard
        assert (tmp_path / "sharded" / side_fields.MANIFEST).exists() == (process == 0)
    names = sorted(p.name for p in (tmp_path / "appended").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "sharded").iterdir()) and len(names) == 3 * 3 + 1
    for name in names:
        assert (tmp_path / "sharded" / name).read_bytes() == (tmp_path / "appended" / name).read_bytes(), name
    assert json.loads((tmp_path / "sharded" / side_fields.MANIFEST).read_text()) == side_fields.manifest(specs, ranges)
    np.testing.assert_array_equal(side_fields.open_side_field(tmp_path / "sharded", "emb", 23).array(), arrays["emb"])

    again = side_fields.SideFileWriter(tmp_path / "sharded", specs, shard_size=10, num_records=23)
    assert all(again.has_shard(k) for k in range(3)) and again.close()
    np.testing.assert_array_equal(again.read_shard(2, "valid"), arrays["valid"][20:])
    with pytest.raises(ValueError, match="shard 2 holds records \\[20, 23\\); write_shard got 4 rows"):
        writer = side_fields.SideFileWriter(tmp_path / "sharded", specs, shard_size=10, num_records=23)
        writer.write_shard(2, {name: a[:4] for name, a in arrays.items()})
    with pytest.raises(ValueError, match="num_records"):
        side_fields.SideFileWriter(tmp_path / "other", specs).write_shard(0, arrays)
    assert appended == str(tmp_path / "appended")


@pytest.mark.parametrize("num_shards, count", [(5, 2), (3, 4), (10, 3), (0, 2)])
def test_process_shards_partition_the_shards_in_order(num_shards, count):
    parts = [list(side_fields.process_shards(num_shards, p, count)) for p in range(count)]
    assert sum(parts, []) == list(range(num_shards))


def test_unreadable_side_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        side_fields.SideFieldReader(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        side_fields.SideFieldReader(tmp_path / "empty")
    path = side_fields.write_side_file(tmp_path / "gap", {"x": np.zeros(10, np.int32)}, shard_size=4)
    manifest = json.loads((tmp_path / "gap" / "manifest.json").read_text())
    manifest["shards"][1]["start"] = 5
    (tmp_path / "gap" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="contiguous"):
        side_fields.SideFieldReader(path)
    path = side_fields.write_side_file(tmp_path / "short", {"x": np.zeros(10, np.int32)}, shard_size=4)
    np.save(tmp_path / "short" / "x-00001.npy", np.zeros(3, np.int32))  # a shard that lost a row
    reader = side_fields.SideFieldReader(path)
    np.testing.assert_array_equal(reader[0], 0)
    with pytest.raises(ValueError, match="x-00001.npy"):
        reader[5]
    with pytest.raises(ValueError, match="x-00001.npy"):  # every shard at once, before reading any row
        side_fields.SideFieldReader(path).check_files()
    np.save(tmp_path / "short" / "x-00001.npy", np.zeros(4, np.int32))
    side_fields.SideFieldReader(path).check_files()
    (tmp_path / "short" / "x-00002.npy").unlink()  # a shard that is gone
    with pytest.raises(ValueError, match="x-00002.npy"):
        side_fields.SideFieldReader(path).check_files()


# ------------------------------------------------------------------------------- through the pipeline


def test_each_example_keeps_its_own_field_through_shuffling(labelled):
    config, labels = labelled
    it = make_iterator(config)
    seen = [assert_consistent(next(it), labels) for _ in range(15)]  # two epochs of 30
    it.close()
    first, second = np.concatenate(seen[:7] + [seen[7][:2]]), np.concatenate([seen[7][2:]] + seen[8:])
    assert sorted(first.tolist()) == sorted(second.tolist()) == list(range(N))
    assert first.tolist() != list(range(N)) and first.tolist() != second.tolist()  # shuffled, per epoch


def test_mid_epoch_resume_is_exact_with_side_fields(labelled):
    config, labels = labelled
    reference = make_iterator(config)
    ref = [next(reference) for _ in range(12)]  # crosses an epoch boundary
    reference.close()
    run = make_iterator(config)
    head = [next(run) for _ in range(5)]
    state = json.loads(json.dumps(run.get_state()))  # what a checkpoint stores
    run.close()
    restored = make_iterator(config)
    restored.set_state(state)
    tail = [next(restored) for _ in range(7)]
    restored.close()
    assert_batches_equal(head + tail, ref)
    for batch in tail:
        assert_consistent(batch, labels)


def test_two_processes_split_examples_and_keep_their_fields(labelled):
    config, labels = labelled
    single = make_iterator(config, batch=6, seed=3)  # 5 global batches per epoch: none spans two epochs
    p0 = make_iterator(config, batch=3, seed=3, process_index=0, process_count=2)
    p1 = make_iterator(config, batch=3, seed=3, process_index=1, process_count=2)
    for _ in range(12):  # crosses two epoch boundaries
        g, a, b = next(single), next(p0), next(p1)
        ia, ib, ig = (assert_consistent(x, labels) for x in (a, b, g))
        assert not set(ia.tolist()) & set(ib.tolist())
        assert sorted(ia.tolist() + ib.tolist()) == sorted(ig.tolist())
    for it in (single, p0, p1):
        it.close()


def test_image_only_pipeline_needs_no_caption(tmp_path, labelled):
    config, labels = labelled
    no_captions = write_source(tmp_path, record=lambda i: {"image": _png_of_index(i), **(
        {"caption": ""} if i % 3 == 0 else {} if i % 3 == 1 else {"caption": "item"})})
    config.path = no_captions
    fields = {"image": image_field(SIZE), "cluster_labels": LABELS}
    it = make_iterator(config, fields=fields, tokenizer=None)
    for _ in range(10):
        batch = next(it)
        assert_consistent(batch, labels, keys=fields)
        assert int(batch["skipped"]) == 0
    it.close()


def test_text_only_pipeline_decodes_no_image(tmp_path, labelled):
    config, labels = labelled
    config.path = write_source(tmp_path, record=lambda i: {"image": b"not an image", "caption": f"item {i}"})
    fields = {"text": text_field(CONTEXT), "cluster_labels": LABELS}
    it = make_iterator(config, fields=fields)
    seen = []
    for _ in range(10):
        batch = next(it)
        assert list(batch) == ["text", "cluster_labels", "skipped"] and int(batch["skipped"]) == 0
        idx = batch["text"][:, 0] - 1
        np.testing.assert_array_equal(batch["cluster_labels"], labels[idx])
        seen += idx.tolist()
    assert sorted(seen[:N]) == list(range(N))
    it.close()


@pytest.mark.parametrize("kind", ["npy", "side_file"])
def test_subset_source_reads_side_fields_by_original_index(tmp_path, labelled, kind):
    config, labels = labelled
    subset = np.asarray([17, 3, 29, 3, 8, 0, 21, 12, 5, 26], np.int64)  # record 3 twice: drawn twice per epoch
    if kind == "npy":
        np.save(tmp_path / "subset.npy", subset)
        config.subset = str(tmp_path / "subset.npy")
    else:
        config.subset = side_fields.write_side_file(tmp_path / "selected", {
            "index": subset, "score": np.linspace(0, 1, len(subset)).astype(np.float32)}, shard_size=4)
    it = make_iterator(config, batch=5)
    seen = [assert_consistent(next(it), labels) for _ in range(6)]  # three epochs of the 10-record subset
    it.close()
    for epoch in range(3):
        assert sorted(np.concatenate(seen[2 * epoch:2 * epoch + 2]).tolist()) == sorted(subset.tolist())


def test_subset_indices_are_checked(tmp_path, labelled):
    config, _ = labelled
    np.save(tmp_path / "too_far.npy", np.asarray([1, 2, N], np.int64))
    config.subset = str(tmp_path / "too_far.npy")
    with pytest.raises(ValueError, match=rf"too_far.npy.*record index {N}.*{N} records"):
        make_iterator(config)
    np.save(tmp_path / "floats.npy", np.asarray([1.0, 2.0]))
    config.subset = str(tmp_path / "floats.npy")
    with pytest.raises(ValueError, match="floats.npy.*integer"):
        make_iterator(config)
    config.subset = str(tmp_path / "missing.npy")
    with pytest.raises(ValueError, match="config.data.subset=.*missing.npy.* does not exist"):
        data_config.resolve_data_config(config)


def test_wrong_length_side_file_is_a_clear_error(tmp_path, labelled):
    config, labels = labelled
    config.side_fields.cluster_labels = side_fields.write_side_file(tmp_path / "short", {"cluster_labels": labels[:-1]})
    with pytest.raises(ValueError, match=rf"short.* has {N - 1} rows but the source has {N} records"):
        make_iterator(config)
    # A side file describes the full source, not a subset of it.
    np.save(tmp_path / "subset.npy", np.arange(10, dtype=np.int64))
    config.subset = str(tmp_path / "subset.npy")
    np.save(tmp_path / "ten.npy", labels[:10])
    config.side_fields.cluster_labels = str(tmp_path / "ten.npy")
    with pytest.raises(ValueError, match=rf"ten.npy.* has 10 rows but the source has {N} records"):
        make_iterator(config)


def test_side_files_must_match_the_declared_field_and_be_keyed_by_record_index(tmp_path, labelled):
    config, labels = labelled
    config.side_fields.cluster_labels = side_fields.write_side_file(
        tmp_path / "floats", {"cluster_labels": labels.astype(np.float32)})
    with pytest.raises(ValueError, match="floats.*float32\\[8\\].*int32\\[8\\]"):
        make_iterator(config)
    config.side_fields.cluster_labels = side_fields.write_side_file(tmp_path / "wide",
                                                                    {"cluster_labels": labels[:, :4]})
    with pytest.raises(ValueError, match="wide.*int32\\[4\\].*int32\\[8\\]"):
        make_iterator(config)
    # Embeddings of a shuffled run: rows are not record indices, so the file cannot serve as a side file.
    order = np.random.default_rng(3).permutation(N)
    config.side_fields.cluster_labels = side_fields.write_side_file(
        tmp_path / "shuffled", {"cluster_labels": labels[order], "index": order.astype(np.int64)}, shard_size=8)
    with pytest.raises(ValueError, match="shuffled.*not keyed by record index"):
        make_iterator(config)


def test_side_field_config_keys(tmp_path, labelled):
    config, _ = labelled
    resolved = data_config.resolve_data_config(config)
    assert dict(resolved.side_fields) == dict(config.side_fields)
    with pytest.raises(ValueError, match=r"config.data.side_fields.cluster_labels=.*nowhere.npy.* does not exist"):
        data_config.resolve_data_config({"side_fields": {"cluster_labels": str(tmp_path / "nowhere.npy")}})
    with pytest.raises(ValueError, match="config.data.side_fields.image"):
        data_config.resolve_data_config({"side_fields": {"image": str(tmp_path)}})
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="config.data.side_fields.cluster_labels.*notes.txt"):
        data_config.resolve_data_config({"side_fields": {"cluster_labels": str(tmp_path / "notes.txt")}})
    assert dict(data_config.resolve_data_config({"side_fields": {"cluster_labels": ""}}).side_fields) == {}

    # A config that declares the name (empty path: unset) can take the path from the command line.
    from absl import flags
    from ml_collections import config_flags

    root = ml_collections.ConfigDict({"data": data_config.default_data_config()})
    root.data.side_fields = {"cluster_labels": ""}
    argv = ["prog", f"--config.data.side_fields.cluster_labels={config.side_fields.cluster_labels}"]
    flag_values = flags.FlagValues()
    config_flags.DEFINE_config_dict("config", root, flag_values=flag_values, lock_config=True, sys_argv=argv)
    flag_values(argv)
    got = data_config.resolve_data_config(flag_values.config.data)
    assert dict(got.side_fields) == {"cluster_labels": config.side_fields.cluster_labels}


def test_bad_per_record_fields_are_skipped_and_counted(tmp_path):
    """Extra fields from the records themselves: every bad one is skipped, and the count is exact."""
    def good(i):
        return {"image": _png_of_index(i), "caption": f"item {i}", "labels": [i] * 8, "weight": i / 10}

    bad = {
        2: {"image": _png_of_index(2), "caption": "item 2", "weight": 1.0},  # no labels
        5: {**good(5), "labels": [5] * 7},  # wrong length
        7: {**good(7), "labels": [[7] * 4, [7] * 4]},  # wrong shape
        11: {**good(11), "labels": ["seven"] * 8},  # not numbers
        13: {**good(13), "labels": [1.5] * 8},  # floats for an int field
        17: {**good(17), "labels": [2**40] * 8},  # does not fit int32
        19: {**good(19), "weight": None},  # missing value
        20: {**good(20), "weight": 1e300},  # overflows float32
        23: {**good(23), "labels": [1, [2]] * 4},  # ragged
    }
    path = write_source(tmp_path, record=lambda i: bad.get(i) or good(i))
    config = data_config.default_data_config()
    config.update({"source": "array_record", "path": path, "prefetch": 0})
    fields = {"image": image_field(SIZE), "text": text_field(CONTEXT), "labels": LABELS,
              "weight": FieldSpec((), "float32")}
    seed, batch_size = 5, 3
    it = make_iterator(config, fields=fields, batch=batch_size, seed=seed)
    position = total = 0
    for _ in range(25):  # 75 valid examples: more than three epochs
        batch = next(it)
        expected = taken = 0
        while taken < batch_size:  # replay the stream to know what each batch must have skipped
            _, index = pipeline.shuffled_record_index(position, N, seed)
            position += 1
            expected, taken = (expected + 1, taken) if index in bad else (expected, taken + 1)
        assert int(batch["skipped"]) == expected
        idx = index_of(batch["image"])
        assert batch["labels"].dtype == np.int32 and batch["weight"].dtype == np.float32
        np.testing.assert_array_equal(batch["labels"], np.repeat(idx[:, None], 8, axis=1))
        np.testing.assert_array_equal(batch["weight"], (idx / 10).astype(np.float32))
        total += expected
    assert total >= 3 * len(bad) and it.get_state()["next_index"] == position
    it.close()


def test_synthetic_label_as_a_declared_field():
    config = data_config.default_data_config()
    config.update({"source": "synthetic", "synthetic_size": 20})
    source = sources.make_source(config)
    it = make_iterator(config, fields={"text": text_field(6), "label": FieldSpec((), "int32")},
                       tokenizer=lambda caps: np.asarray([[len(c)] * 6 for c in caps], np.int32), batch=20)
    batch = next(it)
    captions = {len(source[i]["caption"]): source[i]["label"] for i in range(20)}
    assert batch["label"].dtype == np.int32 and batch["label"].shape == (20,)
    assert all(captions.get(int(n)) is not None for n in batch["text"][:, 0])
    assert sorted(batch["label"].tolist()) == sorted(source[i]["label"] for i in range(20))
    it.close()


def test_declarations_are_checked(labelled):
    config, _ = labelled
    with pytest.raises(ValueError, match="image_size"):
        make_iterator(config, fields={"image": image_field(SIZE + 1)})
    with pytest.raises(ValueError, match="skipped"):
        make_iterator(config, fields={"image": image_field(SIZE), "skipped": FieldSpec((), "int64")})
    with pytest.raises(ValueError, match="tokenizer"):
        make_iterator(config, fields={"text": text_field(CONTEXT)}, tokenizer=None)
    it = make_iterator(config, fields={"text": text_field(CONTEXT + 1)})
    with pytest.raises(ValueError, match="declares"):
        next(it)


def test_readers_and_subsets_pickle_without_their_memory_maps(tmp_path, labelled):
    """What grain worker processes receive: readers that reopen their files, subsets that keep their indices."""
    config, labels = labelled
    reader = side_fields.SideFieldReader(config.side_fields.cluster_labels, field="cluster_labels")
    np.testing.assert_array_equal(reader[3], labels[3])  # opened here: the copy must not carry the map
    clone = pickle.loads(pickle.dumps(reader))
    assert clone._arrays == {} and clone.path == reader.path
    np.testing.assert_array_equal(clone[20], labels[20])
    np.save(tmp_path / "subset.npy", np.asarray([4, 9], np.int64))
    config.subset = str(tmp_path / "subset.npy")
    subset = pickle.loads(pickle.dumps(sources.make_source(config)))
    assert len(subset) == 2 and subset.original_index(1) == 9 and len(sources.full_source(subset)) == N
    assert subset[1]["caption"] == "item 9"


@pytest.mark.slow
def test_worker_processes_give_the_same_batches(tmp_path, labelled):
    config, labels = labelled
    np.save(tmp_path / "subset.npy", np.arange(2, 24, dtype=np.int64))
    config.subset = str(tmp_path / "subset.npy")
    config.prefetch = 1
    reference = make_iterator(config)
    ref = [next(reference) for _ in range(6)]
    reference.close()
    config.num_workers = 2
    workers = make_iterator(config)
    got = [next(workers) for _ in range(6)]
    workers.close()
    assert_batches_equal(got, ref)
    for batch in got:
        assert_consistent(batch, labels)
