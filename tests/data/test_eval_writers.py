"""A labelled, captioned image set written in every layout eval_data reads, and read back through it unchanged."""
import importlib.util
import os

import numpy as np
import pytest

from clus_jax.data import eval_writers as W
from clus_jax.data.eval_data import normalize_template, open_eval_data
from clus_jax.data.transforms import decode_image

_HAS_TFDS = importlib.util.find_spec("tensorflow_datasets") is not None
needs_tfds = pytest.mark.skipif(not _HAS_TFDS, reason="tensorflow-datasets is not installed (it is in the test extra)")

CLASSNAMES = ["cat", "dog", "snowy owl"]
TEMPLATES = ["a photo of a {}.", "a drawing of the {c}."]
FORMATS = ["folder", "wds", "arrayrecord", pytest.param("tfds", marks=needs_tfds)]


def _sample(n: int = 30, grey: bool = False):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, 12, 10) if grey else (n, 12, 10, 3), dtype=np.uint8)
    labels = (np.arange(n) * 7) % 3  # interleaved classes: the order written is the order read
    captions = [[f"image {i}", f"a {CLASSNAMES[label]} numbered {i}"] for i, label in enumerate(labels)]
    return images, labels, captions


def _write(fmt: str, root, images, labels, captions, classnames=CLASSNAMES, templates=TEMPLATES) -> str:
    """Writes the set in ``fmt`` under ``root``; returns its reference."""
    if fmt == "folder":
        W.write_image_folder(root / "folder", images, labels, classnames, captions, templates)
        return f"folder:{root / 'folder'}"
    if fmt == "wds":
        W.write_wds(root / "wds", images, labels, captions, classnames, templates, shard_size=7)
        return f"wds:{root / 'wds'}"
    if fmt == "arrayrecord":
        return "arrayrecord:" + W.write_array_records(root / "set.array_record", images, labels, captions)
    W.write_tfds(root / "tfds", "clus_jax_tiny_eval", images, labels, captions, classnames)
    return "tfds:clus_jax_tiny_eval:test"


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("grey", [False, True], ids=["rgb", "grey"])
def test_round_trip(fmt, grey, tmp_path):
    images, labels, captions = _sample(grey=grey)
    data = open_eval_data(_write(fmt, tmp_path, images, labels, captions), data_dir=str(tmp_path / "tfds"))
    # An image folder is read class by class; every other layout keeps the order written.
    order = np.argsort(labels, kind="stable") if fmt == "folder" else np.arange(len(images))
    assert len(data) == len(images)
    for i, j in enumerate(order):
        record = data.record(i)
        assert record["label"] == labels[j]
        assert record["captions"] == captions[j]
        expected = np.repeat(images[j][..., None], 3, -1) if grey else images[j]
        np.testing.assert_array_equal(decode_image(record["image"]), expected)
    if fmt != "arrayrecord":  # ArrayRecord files hold records only
        assert data.classnames == CLASSNAMES
    if fmt in ("folder", "wds"):
        assert [normalize_template(t) for t in data.templates] == [normalize_template(t) for t in TEMPLATES]


def test_wds_layout(tmp_path):
    images, labels, captions = _sample(10)
    W.write_wds(tmp_path / "cls", images, labels, None, CLASSNAMES, TEMPLATES, split="train", shard_size=4)
    assert sorted(os.listdir(tmp_path / "cls" / "train")) == ["0.tar", "1.tar", "2.tar", "nshards.txt"]
    assert (tmp_path / "cls" / "train" / "nshards.txt").read_text() == "3\n"
    assert (tmp_path / "cls" / "zeroshot_classification_templates.txt").read_text() == (
        "a photo of a {c}.\na drawing of the {c}.\n")  # CLIP_benchmark's form
    assert (tmp_path / "cls" / "dataset_type.txt").read_text() == "classification\n"
    data = open_eval_data(f"wds:{tmp_path / 'cls'}:train")
    assert [data.label(i) for i in range(10)] == labels.tolist() and data.captions(0) == []

    W.write_wds(tmp_path / "ret", images, None, captions)  # captions without labels: a retrieval set
    assert (tmp_path / "ret" / "dataset_type.txt").read_text() == "retrieval\n"
    assert not (tmp_path / "ret" / "classnames.txt").exists()
    data = open_eval_data(f"wds:{tmp_path / 'ret'}")
    assert data.label(3) is None and data.captions(3) == captions[3] and data.classnames is None


def test_unlabelled_folder(tmp_path):
    images, _, captions = _sample(5)
    W.write_image_folder(tmp_path / "f", images, captions=captions)
    assert sorted(os.listdir(tmp_path / "f"))[:3] == ["000000.png", "000000.txt", "000001.png"]
    data = open_eval_data(f"folder:{tmp_path / 'f'}")
    assert len(data) == 5 and data.label(2) is None and data.captions(2) == captions[2]


def test_every_class_has_a_folder(tmp_path):
    images, _, _ = _sample(4)
    W.write_image_folder(tmp_path / "f", images, [0, 0, 3, 3], ["a", "b", "c", "d"])
    assert sorted(os.listdir(tmp_path / "f")) == ["c00000", "c00001", "c00002", "c00003", "classnames.txt"]
    assert open_eval_data(f"folder:{tmp_path / 'f'}").classnames == ["a", "b", "c", "d"]


def test_bad_input_refused(tmp_path):
    images, labels, captions = _sample(6)
    with pytest.raises(ValueError, match="label 2 but only 2 class names"):
        W.write_wds(tmp_path / "a", images, labels, classnames=["x", "y"])
    with pytest.raises(ValueError, match="captions of image 1"):
        W.write_array_records(tmp_path / "b", images, labels, [["ok"], ["two\nlines"]] + captions[2:])
    with pytest.raises(ValueError, match="captions: 2 lists for 6 images"):
        W.write_array_records(tmp_path / "b", images, labels, captions[:2])
    with pytest.raises(ValueError, match="images must be uint8"):
        W.write_image_folder(tmp_path / "c", images.astype(np.float32), labels)
    with pytest.raises(ValueError, match="classnames: each entry"):
        W.write_image_folder(tmp_path / "c", images, labels, ["x", " y", "z"])
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "old.png").write_bytes(b"")
    with pytest.raises(FileExistsError, match="is not empty"):
        W.write_image_folder(tmp_path / "d", images, labels)
    assert os.listdir(tmp_path / "d") == ["old.png"]


@needs_tfds
def test_tfds_written_once_and_features_required(tmp_path):
    images, labels, _ = _sample(6)
    W.write_tfds(tmp_path, "clus_jax_tiny_eval", images, labels)
    with pytest.raises(FileExistsError, match="'clus_jax_tiny_eval' is already in"):
        W.write_tfds(tmp_path, "clus_jax_tiny_eval", images[:2], labels[:2], split="train")
    data = open_eval_data("tfds:clus_jax_tiny_eval:test", data_dir=str(tmp_path))
    assert len(data) == 6 and data.captions(1) == [] and data.classnames == ["0", "1", "2"]
    with pytest.raises(ValueError, match="give its features"):
        W.write_tfds_examples(tmp_path, "clus_jax_no_features", [])


@needs_tfds
def test_tfds_stand_in_under_a_registered_name(tmp_path):
    """A few images as TFDS's own imagenet2012, read by its registered builder like the prepared real set."""
    import tensorflow_datasets as tfds

    images, labels, _ = _sample(8, grey=True)
    labels = labels * 300 + 1
    W.write_tfds(tmp_path, "imagenet2012", images, labels, split="validation")
    source = tfds.data_source("imagenet2012", split="validation", data_dir=str(tmp_path))
    assert type(source.dataset_info.features["label"]).__name__ == "ClassLabel"
    assert [int(source[i]["label"]) for i in range(8)] == labels.tolist()
    assert source[5]["file_name"] == b"000005.png"
    data = open_eval_data("tfds:imagenet2012:validation", data_dir=str(tmp_path))
    assert len(data.classnames) == 1000 and data.classnames[0] == "n01440764"
    np.testing.assert_array_equal(decode_image(data.record(3)["image"]), np.repeat(images[3][..., None], 3, -1))
    with pytest.raises(ValueError, match="names its own classes"):
        W.write_tfds(tmp_path / "a", "imagenet2012", images, labels % 3, classnames=CLASSNAMES, split="validation")
    with pytest.raises(ValueError, match="no 'captions' feature"):
        W.write_tfds(tmp_path / "b", "imagenet2012", images, labels, [["c"]] * 8, split="validation")
    with pytest.raises(ValueError, match="registers this name"):
        W.write_tfds_examples(tmp_path / "c", "imagenet2012", [], features=tfds.features.FeaturesDict({}))
    assert not list(tmp_path.glob("[abc]/*"))  # a failed write leaves nothing
