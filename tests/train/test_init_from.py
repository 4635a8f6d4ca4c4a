"""config.init_from: a LiT stage from a CLIP run's workdir, partial loading, mode 'resume' (a MoDE expert
continuing its seed's optimizer and schedule), and errors before compiling."""
import json
import logging
import os
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from etils import epath

from clus_jax.config.base import TOWER_PATTERNS
from clus_jax.models import flops as flops_lib
from clus_jax.train.experiment import build
from clus_jax.objectives import teachers
from clus_jax.objectives.registry import ConfigError
from clus_jax.train import loop
from clus_jax.train.optim import learning_rate_schedule
from clus_jax.common.trees import path_str

import train_helpers as helpers  # registered by tests/conftest.py

IMAGE_TOWER = r"^image(_proj)?/"


def flat(tree):
    return {path_str(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(tree)}


@pytest.fixture(scope="module")
def clip_run(tmp_path_factory):
    """A finished tiny CLIP run (its newest checkpoint is the source of every test here)."""
    workdir = str(tmp_path_factory.mktemp("clip_run"))
    config = helpers.tiny_config("clip", total_steps=6, checkpoint_every=3, seed=1)
    loop.train_and_evaluate(config, workdir)
    return workdir, flat(teachers.load_params(workdir))


def lit_config(workdir, **overrides):
    c = helpers.tiny_config("clip", **{"total_steps": 5, "checkpoint_every": 5, **overrides})
    c.init_from.path = workdir
    c.init_from.include = IMAGE_TOWER
    c.param_groups = [(IMAGE_TOWER, {"frozen": True})]
    return c


@pytest.mark.slow  # the tests that read a trained run (the clip_run fixture)
def test_lit_stage_keeps_the_loaded_image_tower_bit_identical(clip_run, tmp_path):
    source, saved = clip_run
    config = lit_config(source)
    exp = build(config)
    start = flat(exp.init_state()["params"])
    fresh = flat(build(helpers.tiny_config("clip", total_steps=5)).init_state()["params"])
    image_keys = [k for k in saved if k.startswith(("image/", "image_proj/"))]
    text_keys = [k for k in saved if k.startswith(("text/", "text_proj/"))]
    assert image_keys and text_keys
    for k in image_keys:  # loaded from the CLIP run
        np.testing.assert_array_equal(start[k], saved[k], err_msg=k)
    for k in text_keys:  # not selected by include: initialised fresh, exactly as a run without init_from
        np.testing.assert_array_equal(start[k], fresh[k], err_msg=k)

    workdir = str(tmp_path / "lit")
    loop.train_and_evaluate(config, workdir)
    after = flat(teachers.load_params(workdir))
    for k in image_keys:
        np.testing.assert_array_equal(after[k], saved[k], err_msg=k)
    changed = [k for k in text_keys if not np.array_equal(after[k], start[k])]
    assert len(changed) == len(text_keys), sorted(set(text_keys) - set(changed))
    # The frozen tower has no optimizer state at all.
    opt_leaves = jax.tree_util.tree_leaves_with_path(exp.abstract_state["opt_state"])
    assert not any("image/encoder" in jax.tree_util.keystr(p) for p, _ in opt_leaves)


@pytest.mark.slow
def test_frozen_tower_costs_less_compute_and_memory(clip_run):
    source, _ = clip_run

    def compiled(config):
        exp = build(config)
        return exp.step.jitted.lower(exp.abstract_state, exp.abstract_batch()).compile()

    frozen = compiled(lit_config(source))
    trainable_config = lit_config(source)
    trainable_config.param_groups = []
    trainable = compiled(trainable_config)
    flops = [c.cost_analysis()["flops"] for c in (frozen, trainable)]
    temps = [c.memory_analysis().temp_size_in_bytes for c in (frozen, trainable)]
    # No backward pass through the image tower: the saving is about twice its forward FLOPs (XLA counts
    # per device; the batch is split over all of them).
    config = lit_config(source)
    parts = flops_lib.forward_flops_per_example(config.model)
    per_device = config.batch_size / jax.device_count()
    image_forward = per_device * sum(v for k, v in parts.items() if k.startswith("image_"))
    assert flops[1] - flops[0] > 1.6 * image_forward, (flops, image_forward)
    assert temps[0] < temps[1], temps  # its activations are not kept for a gradient


@pytest.mark.slow
def test_resume_ignores_init_from(clip_run, tmp_path):
    """A run that restarts from its own checkpoint never reads the init_from source again."""
    source, _ = clip_run
    copy = tmp_path / "source_copy"
    shutil.copytree(source, copy)
    workdir = str(tmp_path / "resume")
    config = lit_config(str(copy), total_steps=4, checkpoint_every=2)
    loop.train_and_evaluate(config, workdir)
    shutil.rmtree(copy)  # would fail the restart if it were read
    with pytest.raises(ConfigError, match="config.init_from.path"):
        build(config)  # a fresh start does check the source
    config.total_steps = 6
    loop.train_and_evaluate(config, workdir)
    saved = sorted(int(n) for n in os.listdir(os.path.join(workdir, "checkpoints")) if n.isdigit())
    assert saved[-1] == 6


@pytest.mark.slow
def test_shape_mismatch_fails_before_compiling_naming_the_parameter(clip_run):
    source, _ = clip_run
    config = lit_config(source)
    config.model.embed_dim = 48  # the projections no longer fit
    with pytest.raises(ConfigError, match=r"parameter image_proj/kernel is saved as \(64, 32\)"):
        build(config)


@pytest.mark.slow
def test_exclude_and_fresh_parameters(clip_run):
    """Everything but the logit scale comes from the source; a parameter the source lacks starts fresh."""
    source, saved = clip_run
    config = helpers.tiny_config("swap", total_steps=5)
    config.objectives = {"clip": 1.0, "swap": 0.5}
    config.swap.num_prototypes = (8,)
    config.init_from.path = source
    config.init_from.exclude = r"^logit_scale$"
    params = flat(build(config).init_state()["params"])
    fresh = flat(build(helpers.tiny_config("swap", total_steps=5, **{"swap.num_prototypes": (8,)})).init_state()["params"])
    for k in saved:
        if k == "logit_scale":
            np.testing.assert_array_equal(params[k], fresh[k])
        else:
            np.testing.assert_array_equal(params[k], saved[k], err_msg=k)
    assert params["swap/bank_0"].shape == (8, 32)


@pytest.mark.slow
def test_bad_source_and_selection_fail_naming_the_key(clip_run, tmp_path):
    source, _ = clip_run
    config = lit_config(str(tmp_path / "nowhere"))
    with pytest.raises(ConfigError, match=r"config\.init_from\.path="):
        build(config)
    config = lit_config(source)
    config.init_from.include = "^no_such_parameter"
    with pytest.raises(ConfigError, match=r"config\.init_from\.include"):
        build(config)
    config.init_from.include = "(unclosed"
    with pytest.raises(ConfigError, match=r"config\.init_from\.include=.*not a valid regex"):
        build(config)


# An open_clip checkpoint as the source (clus_jax.interop; tests/test_interop.py runs one from step 0).
OPEN_CLIP = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "interop", "vectors", "quickgelu")


def open_clip_config(**overrides):
    from clus_jax.interop import open_clip

    weights, model_cfg = os.path.join(OPEN_CLIP, "open_clip_model.safetensors"), os.path.join(OPEN_CLIP, "model_config.json")
    _, cfg, preprocess = open_clip.resolve(weights, model_cfg)
    c = open_clip.run_config(cfg, preprocess, base=helpers.tiny_config("clip", **overrides))
    c.init_from.path, c.init_from.open_clip_config = weights, model_cfg
    return c


def test_open_clip_source_with_another_architecture_fails_naming_the_key():
    config = open_clip_config()
    config.model.image.act = "gelu"  # same shapes, another function
    with pytest.raises(ConfigError, match=r"config\.model\.image\.act='gelu' \(the open_clip config's: 'quick_gelu'\)"):
        build(config)
    config = open_clip_config()
    config.model.image.mean = (0.5, 0.5, 0.5)
    with pytest.raises(ConfigError, match=r"config\.model\.image\.mean"):
        build(config)
    config = open_clip_config()
    config.init_from.open_clip_config = ""  # a weights file says nothing about its architecture
    with pytest.raises(ConfigError, match=r"config\.init_from\.path=.*give its open_clip model config"):
        build(config)


def test_an_open_clip_source_cannot_be_resumed():
    config = open_clip_config()
    config.init_from.mode = "resume"
    with pytest.raises(ConfigError, match=r"config\.init_from\.path=.* is an open_clip checkpoint, which holds no "
                                          r"optimizer state: config\.init_from\.mode='resume' needs a clus_jax run"):
        build(config)


def test_open_clip_lit_selection_checks_and_loads_only_the_image_tower():
    from clus_jax.train.experiment import abstract_params
    from clus_jax.train import init_from

    config = open_clip_config()
    config.init_from.include = IMAGE_TOWER
    config.model.text.update(dict(act="gelu", width=64, heads=2, mlp_dim=128))  # a new text tower of its own
    loaded = init_from.check(config, abstract_params(config))
    assert loaded and all(p.startswith(("image/", "image_proj/")) for p in loaded)
    assert "image/encoder/block_0/ls1" in loaded and "image/patch_embed/kernel" in loaded


# Mode 'resume': a seed that stops at step 4 of an 8-step schedule, with two parameter groups (the default's
# slow text tower: optax.multi_transform, MaskedNode leaves), and experts that resume it.
SEED_STEPS, SCHEDULE = 4, 8


def seed_config(**overrides):
    c = helpers.tiny_config("clip", **{"total_steps": SEED_STEPS, "checkpoint_every": 2, "seed": 3, **overrides})
    c.param_groups = [(TOWER_PATTERNS["text"], {"lr_mult": 0.03})]
    c.optim.schedule_steps = SCHEDULE
    return c


@pytest.fixture(scope="module")
def seed_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("seed_run"))
    loop.train_and_evaluate(seed_config(), workdir)
    return workdir


def expert_config(seed_dir, schedule_steps=0, **overrides):
    """Resumes the seed; by default total_steps is the seed's schedule length, so the schedule is the seed's."""
    c = seed_config(**{"total_steps": SCHEDULE, "log_every": 1, **overrides})
    c.optim.schedule_steps = schedule_steps
    c.init_from.path, c.init_from.mode = seed_dir, "resume"
    return c


def saved_state(seed_dir):
    """The seed's newest checkpoint, every array as NumPy, by orbax's names ('opt_state.1...mu.image...')."""
    directory = epath.Path(teachers.resolve_checkpoint(seed_dir))
    handler = ocp.PyTreeCheckpointHandler()
    as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), handler.metadata(directory).tree)
    with ocp.Checkpointer(handler) as checkpointer:
        tree = checkpointer.restore(directory, args=ocp.args.PyTreeRestore(restore_args=as_numpy))
    return state_arrays(tree)


def state_arrays(tree):
    flat = ocp.tree.to_flat_dict(ocp.tree.serialize_tree(tree, keep_empty_nodes=True))
    return {".".join(map(str, k)): np.asarray(v) for k, v in flat.items() if hasattr(v, "shape")}


@pytest.mark.slow
def test_resume_mode_restores_the_seeds_optimizer_moments_and_step(seed_run, caplog):
    saved = saved_state(seed_run)
    with caplog.at_level(logging.INFO, logger="clus_jax"):
        state = build(expert_config(seed_run)).init_state()
    started = state_arrays({k: state[k] for k in ("step", "params", "opt_state")})
    moments = [k for k in started if k.startswith("opt_state.") and (".mu." in k or ".nu." in k)]
    counts = [k for k in started if k.startswith("opt_state.") and k.endswith(".count")]
    assert len(moments) > 20 and len(counts) >= 3, (moments, counts)  # both groups' Adam moments, the schedule's count
    assert set(started) <= set(saved)
    for k in started:  # bit for bit the seed's arrays, on the run's shardings
        np.testing.assert_array_equal(started[k], saved[k], err_msg=k)
    assert int(started["step"]) == SEED_STEPS and all(int(started[k]) == SEED_STEPS for k in counts)
    assert all(np.any(started[k] != 0) for k in moments if ".image." in k)  # not a fresh optimizer's zeros
    lines = [r.getMessage() for r in caplog.records if "init_from: resumed" in r.getMessage()]
    assert len(lines) == 1 and f"checkpoints/{SEED_STEPS} at step {SEED_STEPS}" in lines[0], lines
    assert "optimizer state" in lines[0] and f"total_steps {SCHEDULE}" in lines[0]
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING and "schedule" in r.getMessage()]


@pytest.mark.slow
def test_a_resumed_run_continues_the_seed_schedule_then_resumes_from_itself(seed_run, tmp_path):
    """The first step's learning rate is the seed schedule's at the seed's step; interrupted, the run
    restarts from its own checkpoint (the seed is gone by then)."""
    copy = tmp_path / "seed_copy"
    shutil.copytree(seed_run, copy)
    workdir = str(tmp_path / "expert")
    loop.train_and_evaluate(expert_config(str(copy), SCHEDULE, total_steps=6), workdir)
    shutil.rmtree(copy)  # a restart that read the seed would fail
    loop.train_and_evaluate(expert_config(str(copy)), workdir)
    records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    lr = {r["step"]: r["train/learning_rate"] for r in records if "train/learning_rate" in r}
    assert sorted(lr) == [5, 6, 7, 8], lr  # seed steps 1-4 are the seed's; 5-6 the first start, 7-8 the restart
    seed = seed_config()
    schedule = learning_rate_schedule(seed.optim, seed.total_steps)
    # Logged at step s: the rate of the update from step s - 1. The first is the seed schedule's at the
    # seed's step exactly (a fresh optimizer's would be 0, warming up); later ones within float32 rounding
    # of the cosine (the jitted step fuses it differently from the schedule called here).
    assert lr[SEED_STEPS + 1] == float(np.float32(schedule(SEED_STEPS))) > 0, lr
    np.testing.assert_allclose([lr[s] for s in sorted(lr)], [schedule(s - 1) for s in sorted(lr)], rtol=1e-6)
    saved = sorted(int(n) for n in os.listdir(os.path.join(workdir, "checkpoints")) if n.isdigit())
    assert saved[-1] == SCHEDULE


@pytest.mark.slow
def test_resume_refuses_a_seed_whose_optimizer_is_not_this_runs(seed_run, caplog):
    config = expert_config(seed_run)
    config.param_groups = []  # one group: another optimizer tree
    with pytest.raises(ConfigError, match=r"config\.init_from\.path=.*the optimizer state of step 4 is not this "
                                          r"run's \(\d+ arrays differ, e\.g\. opt_state\..*\): another optimizer"):
        build(config)
    config = expert_config(seed_run, **{"optim.mu_dtype": "bfloat16"})
    with pytest.raises(ConfigError, match=r"mu\..* saved \(\(.*\), 'float32'\), this run \(\(.*\), 'bfloat16'\)"):
        build(config)
    with pytest.raises(ConfigError, match=r"config\.total_steps=4 must exceed the step 4 of config\.init_from\.path"):
        build(expert_config(seed_run, total_steps=SEED_STEPS))
    with caplog.at_level(logging.WARNING, logger="clus_jax"):  # a schedule of 10 steps is not the seed's 8
        build(expert_config(seed_run, total_steps=10))
    warned = [r.getMessage() for r in caplog.records if "learning-rate schedule is not the one of" in r.getMessage()]
    assert len(warned) == 1 and f"at step {SEED_STEPS}" in warned[0], warned


def test_resume_mode_errors_name_the_key():
    config = helpers.tiny_config("clip")
    config.init_from.path, config.init_from.mode = "/nonexistent/run", "resum"
    with pytest.raises(ConfigError, match=r"config\.init_from\.mode='resum' must be one of \['params', 'resume'\]"):
        build(config)
    config.init_from.mode, config.init_from.include = "resume", IMAGE_TOWER
    with pytest.raises(ConfigError, match=r"config\.init_from\.include=.*mode 'resume' restores every parameter"):
        build(config)
