"""Checkpoints: exact round trip, restore on another mesh (topology change), damaged-latest fallback."""
import glob
import os

import jax
import numpy as np
import pytest

from clus_jax.train.experiment import build
from clus_jax.train.checkpoint import Checkpointer, CheckpointError

import train_helpers as helpers  # registered by tests/conftest.py


def make_state(config, devices):
    exp = build(config, devices)
    return exp.init_state(), exp.abstract_state


def assert_trees_equal(a, b):
    for x, y in zip(jax.tree.leaves(jax.device_get(a)), jax.tree.leaves(jax.device_get(b))):
        np.testing.assert_array_equal(x, y)


def test_restore_on_a_different_mesh(tmp_path):
    config = helpers.tiny_config("clip", **{"mesh.data": 8})
    state, _ = make_state(config, jax.devices())
    ckpt = Checkpointer(str(tmp_path), keep=2)
    ckpt.save(1, state, force=True)
    ckpt.close()
    # Restore on 4 devices with other axis sizes: the target shardings come from the new mesh.
    config4 = helpers.tiny_config("clip", **{"mesh.data": 2, "mesh.fsdp": 2})
    _, abstract4 = make_state(config4, jax.devices()[:4])
    step, restored = Checkpointer(str(tmp_path)).restore(abstract4)
    assert step == 1
    assert_trees_equal(restored, state)
    kernel = restored["params"]["image"]["encoder"]["block_0"]["mlp"]["fc1"]["kernel"]
    assert kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp") and len(kernel.sharding.device_set) == 4


def test_damaged_latest_falls_back_to_previous_with_a_warning(tmp_path, caplog):
    config = helpers.tiny_config("clip")
    state, abstract = make_state(config, jax.devices())
    ckpt = Checkpointer(str(tmp_path), keep=3)
    ckpt.save(1, state, force=True)
    ckpt.wait()
    later = jax.tree.map(lambda x: x + 1 if x.dtype.kind == "f" else x, state)
    ckpt.save(2, later, force=True)
    ckpt.close()
    # Truncate every data file of the newest checkpoint, as a crash during a copy would.
    files = [f for f in glob.glob(os.path.join(tmp_path, "2", "state", "**", "*"), recursive=True)
             if os.path.isfile(f) and os.path.getsize(f) > 0 and "d/" in f.replace(os.sep, "/")]
    assert files
    for f in files:
        with open(f, "r+b") as fh:
            fh.truncate(max(os.path.getsize(f) // 3, 1))
    step, restored = Checkpointer(str(tmp_path)).restore(abstract)
    assert step == 1
    assert_trees_equal(restored, state)
    assert any("checkpoint step 2" in r.message and "could not be restored" in r.message for r in caplog.records)


def test_no_usable_checkpoint_is_an_error_not_a_fresh_start(tmp_path):
    config = helpers.tiny_config("clip")
    state, abstract = make_state(config, jax.devices())
    ckpt = Checkpointer(str(tmp_path))
    ckpt.save(3, state, force=True)
    ckpt.close()
    for f in glob.glob(os.path.join(tmp_path, "3", "state", "**", "*"), recursive=True):
        if os.path.isfile(f):
            with open(f, "wb"):
                pass
    with pytest.raises(CheckpointError, match="no checkpoint could be restored"):
        Checkpointer(str(tmp_path)).restore(abstract)


def truncate_arrays(step_dir):
    """Cuts every array data file of a saved step to a third, as a crash during a copy would."""
    files = [f for f in glob.glob(os.path.join(step_dir, "state", "**", "d", "*"), recursive=True) if os.path.isfile(f)]
    assert files
    for f in files:
        with open(f, "r+b") as fh:
            fh.truncate(max(os.path.getsize(f) // 3, 1))


def test_a_damaged_newest_step_is_moved_aside_in_one_line_and_saved_afresh(tmp_path, caplog):
    config = helpers.tiny_config("clip")
    state, abstract = make_state(config, jax.devices())
    later = jax.tree.map(lambda x: x + 1 if x.dtype.kind == "f" else x, state)
    ckpt = Checkpointer(str(tmp_path), keep=3)
    ckpt.save(1, state, force=True)
    ckpt.wait()
    ckpt.save(2, later, force=True)
    ckpt.close()
    truncate_arrays(tmp_path / "2")
    ckpt = Checkpointer(str(tmp_path), keep=3)
    step, restored = ckpt.restore(abstract)
    assert step == 1
    assert_trees_equal(restored, state)
    # Kept, where orbax does not list it: the next restart does not meet it again.
    assert sorted(os.listdir(tmp_path)) == ["1", "damaged-2"]
    assert ckpt.latest_step() == 1
    (warning,) = [r.getMessage() for r in caplog.records if r.name == "clus_jax.train.checkpoint"]
    assert "\n" not in warning and len(warning) < 600, warning
    assert f"checkpoint step 2 in {tmp_path}" in warning and f"moved it to {tmp_path / 'damaged-2'}" in warning
    assert warning.endswith("resuming from step 1")
    # The run saves step 2 afresh when it gets there (a damaged step 2 kept in place was never saved again).
    assert ckpt.save(2, later, force=True)
    ckpt.close()
    step, restored = Checkpointer(str(tmp_path)).restore(abstract)
    assert step == 2
    assert_trees_equal(restored, later)
