"""<workdir>/config.json: written in full, found from any checkpoint folder, and a loaded config builds the same run."""
import glob
import json
import os

import jax
import ml_collections
import numpy as np
import pytest

from clus_jax.config import base as config_base
from clus_jax.config import run_config
from clus_jax.train.experiment import build
from clus_jax.models.towers import build_model
from clus_jax.objectives import registry

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(REPO, "configs", "*.py")))
TINY = {"model.image.size": "mu", "model.text.size": "mu", "model.image.image_size": 16,
        "model.text.context_length": 8, "model.embed_dim": 32, "batch_size": 16}


def _lists(value):
    """Tuples as lists, so two configs compare by value the way JSON sees them."""
    if isinstance(value, dict):
        return {k: _lists(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_lists(v) for v in value]
    return value


def _shapes_and_shardings(experiment):
    shapes = jax.tree.map(lambda x: (x.shape, str(x.dtype)), experiment.abstract_state)
    specs = jax.tree.map(lambda s: s.spec, experiment.shardings)
    return shapes, specs


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_a_loaded_config_builds_the_same_run(path, tmp_path):
    config = config_base.load_config(path)
    config.update_from_flattened_dict(TINY)
    if "swap" in config.objectives:
        config.swap.num_prototypes = (32, 64)  # a tuple, which JSON writes as a list
        config.swap.queue_length = 0
    run_config.save_run_config(str(tmp_path), config)
    loaded = run_config.load_run_config(str(tmp_path))

    assert _lists(loaded.to_dict()) == _lists(config.to_dict())
    assert build_model(loaded.model) == build_model(config.model)
    # Everything the trainer derives from a config: validation, mesh, rules, optimizer, state and shardings.
    assert _shapes_and_shardings(build(loaded)) == _shapes_and_shardings(build(config))


def test_none_values_field_references_and_tuples_come_back_usable(tmp_path):
    config = config_base.base_config()
    assert config.model.logit_bias_init is None  # a FieldReference(None, float)
    shared = ml_collections.FieldReference(-10.0)
    config.model.logit_bias_init = shared
    config.siglip.chunk_size = 0
    run_config.save_run_config(str(tmp_path), config)
    loaded = run_config.load_run_config(str(tmp_path))

    assert loaded.model.logit_bias_init == -10.0 and build_model(loaded.model).logit_bias_init == -10.0
    assert loaded.data.path is None and loaded.data.cache_dir is None
    batch_rule = dict((r[0], r[1]) for r in loaded.logical_axis_rules)["batch"]
    assert batch_rule == ("data", "fsdp")
    hash(tuple(tuple(r) for r in loaded.logical_axis_rules))  # hashable, as flax's rule context needs
    loaded.data.path = "shards-*.array_record"  # a None value still takes a value
    assert loaded.data.path == "shards-*.array_record"


def test_the_file_holds_every_objectives_knobs(tmp_path):
    config = config_base.base_config()
    config.objectives = {"clip": 1.0, "swap": 0.5}
    del config["swap"]  # an objective whose knobs were never filled in
    run_config.save_run_config(str(tmp_path), config)
    with open(tmp_path / "config.json") as f:
        saved = json.load(f)
    assert saved["swap"] == json.loads(json.dumps(registry.get("swap").defaults))
    assert saved["optim"]["lr"] == config.optim.lr and saved["objectives"] == {"clip": 1.0, "swap": 0.5}

    config.swap = {"temperature": 0.5}  # a knob the config sets stays, the others are filled in under it
    run_config.save_run_config(str(tmp_path), config)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["swap"] == {**json.loads(json.dumps(registry.get("swap").defaults)), "temperature": 0.5}
    assert [p.name for p in tmp_path.iterdir()] == ["config.json"]  # written whole: no temporary file left


def test_found_from_a_workdir_its_checkpoints_a_step_and_a_state_folder(tmp_path):
    workdir = tmp_path / "run"
    run_config.save_run_config(str(workdir), config_base.base_config())
    for where in ("", "checkpoints", "checkpoints/40", "checkpoints/40/state"):
        assert run_config.run_config_path(str(workdir / where)) == workdir / "config.json"
    with pytest.raises(FileNotFoundError, match="no config.json"):
        run_config.load_run_config(str(tmp_path / "elsewhere"))
    # It climbs only through a checkpoint layout, never into an unrelated parent.
    with pytest.raises(FileNotFoundError):
        run_config.load_run_config(str(workdir / "tensorboard"))


def test_values_json_cannot_hold_are_named(tmp_path):
    config = config_base.base_config()
    config.extra_scale = np.float32(0.5)  # numpy scalars and arrays are fine
    config.extra_sizes = np.arange(3)
    run_config.save_run_config(str(tmp_path), config)
    loaded = run_config.load_run_config(str(tmp_path))
    assert loaded.extra_scale == 0.5 and loaded.extra_sizes == (0, 1, 2)
    config.model.text.unknown = object()
    with pytest.raises(TypeError, match="config.model.text.unknown"):
        run_config.save_run_config(str(tmp_path / "b"), config)


def test_one_config_loader_for_the_cli_sweeps_and_tests(tmp_path):
    from clus_jax import sweep

    assert sweep.sweep_points(os.path.join(REPO, "configs", "clip.py"))  # through config_base.load_config_module
    with pytest.raises(FileNotFoundError, match="nope.py"):
        config_base.load_config(str(tmp_path / "nope.py"))
    with pytest.raises(FileNotFoundError, match="nope.py"):
        sweep.sweep_points(str(tmp_path / "nope.py"))


@pytest.mark.parametrize("sets, run", [("embedded", "embedded"), ("none", "none")])
def test_a_config_json_from_before_named_evaluators_loads_and_validates(tmp_path, sets, run):
    """A run saved with ``evals.sets`` (before evaluators had names) still loads, checks and re-evaluates."""
    from clus_jax.config import check

    config = config_base.base_config()
    run_config.save_run_config(str(tmp_path), config)
    path = tmp_path / run_config.CONFIG_FILE
    values = json.loads(path.read_text())
    values["evals"] = {"sets": sets, "batch_size": 64}
    path.write_text(json.dumps(values))
    loaded = run_config.load_run_config(str(tmp_path))
    assert loaded.evals.run == run and loaded.evals.batch_size == 64 and "sets" not in loaded.evals
    assert loaded.evals.embedded.type == "embedded"
    check.validate(loaded, 1)
