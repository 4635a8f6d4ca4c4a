"""A file or folder written through common/files.py appears whole or not at all, and leaves nothing beside it."""
import json

import numpy as np
import pytest

from clus_jax.common import files


def test_atomic_path_renames_a_file_into_place(tmp_path):
    dest = tmp_path / "out.bin"
    dest.write_bytes(b"old")
    with files.atomic_path(dest) as tmp:
        tmp.write_bytes(b"new")
        assert dest.read_bytes() == b"old"  # readers still see the old file while the new one is written
    assert dest.read_bytes() == b"new"
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]


def test_atomic_path_fills_a_folder(tmp_path):
    dest = tmp_path / "model"
    with files.atomic_path(dest) as tmp:
        (tmp / "sub").mkdir(parents=True)
        (tmp / "sub" / "weights").write_bytes(b"w")
    assert (dest / "sub" / "weights").read_bytes() == b"w"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


@pytest.mark.parametrize("folder", [False, True], ids=["file", "folder"])
def test_a_failed_write_leaves_nothing(tmp_path, folder):
    with pytest.raises(RuntimeError, match="cut short"):
        with files.atomic_path(tmp_path / "out") as tmp:
            if folder:
                tmp.mkdir()
                (tmp / "part").write_bytes(b"x")
            else:
                tmp.write_bytes(b"x")
            raise RuntimeError("cut short")
    assert list(tmp_path.iterdir()) == []


def test_atomic_writers(tmp_path):
    files.atomic_write_json(tmp_path / "a.json", {"k": [1, 2]}, indent=2)
    assert (tmp_path / "a.json").read_text() == json.dumps({"k": [1, 2]}, indent=2) + "\n"
    files.atomic_save_npy(tmp_path / "a.npy", np.arange(6).reshape(2, 3).T)
    np.testing.assert_array_equal(np.load(tmp_path / "a.npy"), np.arange(6).reshape(2, 3).T)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "a.npy"]


def test_claim_directory_writes_the_spec_once_and_refuses_another(tmp_path):
    spec = {"k": 3, "levels": (4, 2), "metric": "cosine"}
    files.claim_directory(tmp_path, "stage.json", spec, "another clustering")
    assert json.loads((tmp_path / "stage.json").read_text()) == {"k": 3, "levels": [4, 2], "metric": "cosine"}
    files.claim_directory(tmp_path, "stage.json", dict(spec), "another clustering")  # a re-run: same spec
    with pytest.raises(files.UsageError) as e:
        files.claim_directory(tmp_path, "stage.json", {**spec, "k": 4, "seed": 1}, "another clustering")
    assert str(e.value) == (f"--out {tmp_path} holds another clustering (different k, seed in stage.json); "
                            f"pass another --out")
    assert json.loads((tmp_path / "stage.json").read_text())["k"] == 3


def test_a_partial_claim_checks_the_keys_it_has_and_writes_nothing(tmp_path):
    files.claim_directory(tmp_path, "stage.json", {"k": 3}, "another clustering", partial=True)
    assert not (tmp_path / "stage.json").exists()
    files.claim_directory(tmp_path, "stage.json", {"k": 3, "step": 5}, "another clustering")
    files.claim_directory(tmp_path, "stage.json", {"k": 3}, "another clustering", partial=True)  # step not known yet
    with pytest.raises(files.UsageError, match=r"different k in stage\.json"):
        files.claim_directory(tmp_path, "stage.json", {"k": 4}, "another clustering", partial=True)
    assert json.loads((tmp_path / "stage.json").read_text()) == {"k": 3, "step": 5}
