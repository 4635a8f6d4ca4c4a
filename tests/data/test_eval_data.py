"""Evaluation data references (``clus_jax.data.eval_data``): parsing, the cheap pre-run check, formats' fields.
Reading every format back is in ``test_eval_writers.py``."""
import numpy as np
import pytest

from clus_jax.data import eval_data


@pytest.mark.parametrize("ref, want", [
    ("tfds:imagenet2012:validation", ("tfds", "imagenet2012", "validation")),
    ("tfds:imagenet2012:validation[:1000]", ("tfds", "imagenet2012", "validation[:1000]")),
    ("tfds:imagenet_v2/matched-frequency:test", ("tfds", "imagenet_v2/matched-frequency", "test")),
    ("tfds:mnist:3.0.1:test", ("tfds", "mnist:3.0.1", "test")),
    ("tfds:cifar10", ("tfds", "cifar10", None)),
    ("wds:/data/wds_mnist", ("wds", "/data/wds_mnist", None)),
    ("wds:/data/wds_mnist:train", ("wds", "/data/wds_mnist", "train")),
    ("folder:/data/a:b", ("folder", "/data/a:b", None)),
    ("synthetic:100", ("synthetic", "100", None)),
])
def test_parse_ref(ref, want):
    assert eval_data.parse_ref(ref) == want


@pytest.mark.parametrize("ref", ["imagenet", "hdf5:/x", "folder:", ""])
def test_a_malformed_ref_names_the_kinds(ref):
    with pytest.raises(ValueError, match="KIND:PATH with KIND one of"):
        eval_data.parse_ref(ref)


def test_check_ref_finds_missing_files_without_reading(tmp_path):
    (tmp_path / "wds" / "test").mkdir(parents=True)
    eval_data.check_ref(f"wds:{tmp_path / 'wds'}")
    eval_data.check_ref(f"folder:{tmp_path}")
    eval_data.check_ref("synthetic:5")
    for ref, match in ((f"wds:{tmp_path / 'wds'}:train", "no folder"), (f"folder:{tmp_path / 'nope'}", "no folder"),
                       (f"tar:{tmp_path}/*.tar", "no .* files"), ("synthetic:0", "positive")):
        with pytest.raises((ValueError, FileNotFoundError), match=match):
            eval_data.check_ref(ref)


def test_fields_are_read_from_each_format_s_own_shapes():
    assert eval_data._captions({"text": [b"a cat", "a dog\nsecond"], "id": [1, 2]}) == ["a cat", "a dog", "second"]
    assert eval_data._captions(np.array([b"x", b"y"])) == ["x", "y"]
    assert eval_data._label(b" 7\n") == 7 and eval_data._label([3]) == 3 and eval_data._label(None) is None
    with pytest.raises(ValueError, match="not an integer"):
        eval_data._label(b"seven")
    assert eval_data.normalize_template('a photo of the number: "{c}".') == 'a photo of the number: "{}".'


def test_synthetic_names_its_24_classes():
    data = eval_data.open_eval_data("synthetic:30", limit=10)
    assert len(data) == 10 and len(data.classnames) == 24
    record = data.record(3)
    assert data.classnames[record["label"]] in record["captions"][0]
