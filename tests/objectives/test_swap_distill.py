"""Clus distilled from a frozen teacher with other towers than the student's: a finished Clus run (width 64,
depth 2, 48-wide embeddings, 24 px images) or an open_clip checkpoint (tests/interop/vectors), into a student of
width 32 and depth 1 on 16 px images. The teacher runs forward in the student's step, stays as loaded, and the
student's banks learn to predict its codes."""
import os

import jax
import numpy as np
import pytest

from clus_jax.config import base as config_base
from clus_jax.config import check as config_check
from clus_jax.config.run_config import save_run_config
from clus_jax.interop import open_clip
from clus_jax.objectives import prototypes, registry, teachers
from clus_jax.objectives.registry import ConfigError
from clus_jax.train import teacher_sources
from clus_jax.train.checkpoint import Checkpointer
from clus_jax.train.experiment import build

import tolerances  # registered by tests/conftest.py
import train_helpers as helpers  # registered by tests/conftest.py
from train_helpers import recording  # noqa: F401  (a fixture: the raw gradients in opt_state[0])

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OPEN_CLIP = os.path.join(REPO, "tests", "interop", "vectors", "quickgelu")
WEIGHTS, MODEL_JSON = os.path.join(OPEN_CLIP, "open_clip_model.safetensors"), os.path.join(OPEN_CLIP, "model_config.json")
STEPS, BANKS = 3, (12, 6)


def clus_config(**overrides):
    config = helpers.tiny_config("clip", **{"swap.num_prototypes": BANKS, **overrides})
    config.objectives = {"clip": 1.0, "swap": 0.5}
    config.mesh.update(dict(data=1, fsdp=1, tensor=1))
    return config


def student_config(**overrides):
    """Smaller towers than the teachers': width 32, depth 1, 32-wide embeddings, 16 px; a queue of two batches."""
    config = clus_config(**{"swap.queue_length": 32, **overrides})
    for tower in ("image", "text"):
        config.model[tower].update(dict(width=32, depth=1, heads=2, mlp_dim=64))
    return config


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    """A finished Clus run of larger towers (tiny_config's 'mu': width 64, depth 2), 48-wide, at 24 px."""
    config = clus_config()
    config.model.image.image_size = 24
    config.model.embed_dim = 48
    state = build(config, jax.devices()[:1]).init_state()
    workdir = str(tmp_path_factory.mktemp("teacher"))
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"))
    ckpt.save(5, state, force=True)
    ckpt.close()
    save_run_config(workdir, config)
    return workdir, jax.device_get(state["params"])


def distil(config):
    """STEPS steps of ``config``: the experiment, the host states before every step and after the last, the
    metrics and the batches."""
    exp = build(config, jax.devices()[:1])
    state = exp.init_state()
    states, metrics, batches = [jax.device_get(state)], [], helpers.random_batches(config, STEPS)
    for local in batches:
        state, m = exp.step(state, exp.global_batch(local))
        states.append(jax.device_get(state))
        metrics.append({k: float(v) for k, v in m.items()})
    return exp, states, metrics, batches


def assert_same(got, want):
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
        np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))


def assert_student_learns(states, metrics):
    """Finite losses; the student's banks get gradient from the swap term and move; the teacher is no parameter."""
    for m in metrics:
        assert np.isfinite(m["loss"]) and np.isfinite(m["swap/loss"]) and m["nonfinite"] == 0
    grads = states[-1]["opt_state"][0].grads
    assert set(grads) == set(states[0]["params"]) and "teacher" not in grads[prototypes.PARAMS_KEY]
    for name, g in grads[prototypes.PARAMS_KEY].items():
        assert np.abs(g).max() > 0, name
        assert np.abs(states[-1]["params"][prototypes.PARAMS_KEY][name] - states[0]["params"][prototypes.PARAMS_KEY][name]).max() > 0


@pytest.mark.slow
def test_distils_from_a_clus_run_with_larger_towers(teacher_run, recording):  # noqa: F811
    workdir, saved = teacher_run
    config = config_base.load_config(os.path.join(REPO, "configs", "clus.py") + f":teacher={workdir}")
    assert config.swap.teacher == "checkpoint" and config.swap.teacher_prototypes == "teacher"  # it saved banks
    config = student_config(**{f"swap.{k}": v for k, v in config.swap.items() if k.startswith("teacher")})
    exp, states, metrics, batches = distil(config)
    teacher = states[0]["objective_states"]["swap"]["teacher"]
    assert teacher["towers"]["image_proj"]["kernel"].shape == (64, 48)  # other towers than the student's
    assert states[0]["params"]["image_proj"]["kernel"].shape == (32, 32)
    assert teacher["banks"]["bank_0"].shape == (12, 48)  # its own banks, of the student's sizes
    for state in states:  # the saved run, bit for bit, before and after every step
        t = state["objective_states"]["swap"]["teacher"]
        assert_same(t["towers"], registry.model_params(saved))
        assert_same(t["banks"], saved[prototypes.PARAMS_KEY])
    assert_student_learns(states, metrics)
    # The codes come from the teacher's towers on the student's batch, its images resized to 24 px: the queue
    # keeps those rows (48 wide).
    queue = states[1]["objective_states"]["swap"]["queue"]
    want = jax.jit(lambda p, b: teachers.apply_towers(config.swap.teacher_model, p, b))(teacher["towers"], batches[0])
    for m in ("image", "text"):
        atol = tolerances.network_atol(256, float(np.abs(want[f"{m}_emb"]).max()), 3)
        np.testing.assert_allclose(queue[m][0], want[f"{m}_emb"], rtol=0, atol=atol)
    # Another teacher (its banks' rows in another order) gives the same student another swap loss.
    swap_state = states[0]["objective_states"]["swap"]
    banks = {n: b[::-1] for n, b in swap_state["teacher"]["banks"].items()}
    edited = {**states[0], "objective_states": {**states[0]["objective_states"],
                                                "swap": {**swap_state, "teacher": {**swap_state["teacher"], "banks": banks}}}}
    _, other = exp.step(jax.device_put(edited, exp.shardings), exp.global_batch(batches[0]))
    assert abs(float(other["swap/loss"]) - metrics[0]["swap/loss"]) > 1e-4
    assert float(other["clip/loss"]) == metrics[0]["clip/loss"]


@pytest.mark.slow
def test_a_mesh_of_eight_devices_distils_as_one_device(teacher_run, recording):  # noqa: F811
    """The frozen teacher loads into a data x fsdp mesh as on one device, and each step from the one-device
    run's state gives the same losses and student gradients (summation orders aside)."""
    workdir, _ = teacher_run
    source = config_base.load_config(os.path.join(REPO, "configs", "clus.py") + f":teacher={workdir}")
    config = student_config(**{f"swap.{k}": v for k, v in source.swap.items() if k.startswith("teacher")})
    _, ref_states, ref_metrics, batches = distil(config)
    config.mesh.update(dict(data=4, fsdp=2, tensor=1))
    exp = build(config, jax.devices())
    assert_same(jax.device_get(exp.init_state())["objective_states"]["swap"]["teacher"],
                ref_states[0]["objective_states"]["swap"]["teacher"])
    for t, local in enumerate(batches):
        state, m = exp.step(jax.device_put(ref_states[t], exp.shardings), exp.global_batch(local))
        for key in ("loss", "swap/loss", "clip/loss"):
            ref = ref_metrics[t][key]
            np.testing.assert_allclose(float(m[key]), ref, rtol=0, atol=helpers.loss_atol(ref), err_msg=f"step {t} {key}")
        grads, ref_grads = jax.device_get(state)["opt_state"][0].grads, ref_states[t + 1]["opt_state"][0].grads
        np.testing.assert_allclose(helpers.global_norm(grads), helpers.global_norm(ref_grads), rtol=0,
                                   atol=helpers.grad_norm_atol(ref_grads), err_msg=f"step {t} gradient norm")
        for name, ref in ref_grads[prototypes.PARAMS_KEY].items():  # the student's banks, learning the codes
            np.testing.assert_allclose(grads[prototypes.PARAMS_KEY][name], ref, rtol=0, atol=helpers.grad_atol(ref),
                                       err_msg=f"step {t} {name}")


@pytest.mark.slow
def test_distils_from_an_open_clip_checkpoint(recording):  # noqa: F811
    """open_clip's towers (QuickGELU, layer scale, 32 px, 16-wide) with banks of their own, initialised and frozen."""
    config = student_config()
    teacher_sources.use_frozen_teacher(config, WEIGHTS, MODEL_JSON)
    assert config.swap.teacher_prototypes == "random" and config.swap.teacher_model.image.act == "quick_gelu"
    _, states, metrics, _ = distil(config)
    want = open_clip.read_params(WEIGHTS, MODEL_JSON)
    banks = states[0]["objective_states"]["swap"]["teacher"]["banks"]
    assert [b.shape for b in banks.values()] == [(12, 16), (6, 16)]
    np.testing.assert_allclose(np.linalg.norm(banks["bank_0"], axis=1), 1.0, rtol=0, atol=tolerances.unit_norm_atol(16))
    for state in states:
        teacher = state["objective_states"]["swap"]["teacher"]
        assert_same(teacher["towers"], want)
        assert_same(teacher["banks"], banks)
    assert_student_learns(states, metrics)


@pytest.mark.slow
def test_the_teacher_is_checked_before_compiling(teacher_run):
    workdir, _ = teacher_run
    given = student_config()
    teacher_sources.use_frozen_teacher(given, workdir)
    # Towers that are not the saved run's: the key is named.
    wrong = given.copy_and_resolve_references()
    wrong.swap.teacher_model.image.width = 48
    with pytest.raises(ConfigError, match=r"teacher_checkpoint.*does not match config.swap.teacher_model.*image"):
        build(wrong, jax.devices()[:1])
    # Without teacher_model the teacher must be of the student's shape (the checkpoint teacher before).
    plain = student_config(**{"swap.teacher": "checkpoint", "swap.teacher_checkpoint": workdir})
    with pytest.raises(ConfigError, match=r"does not match config.model"):
        build(plain, jax.devices()[:1])
    # Banks of other sizes than the student's: 'random' gives the teacher banks of its own.
    other_sizes = given.copy_and_resolve_references()
    other_sizes.swap.num_prototypes = (8,)
    with pytest.raises(ConfigError, match=r"swap.*bank_0.*'random'"):
        build(other_sizes, jax.devices()[:1])
    # An open_clip teacher has no banks, and its towers must be its model config's.
    oc = student_config()
    teacher_sources.use_frozen_teacher(oc, WEIGHTS, MODEL_JSON)
    oc.swap.teacher_prototypes = "teacher"
    with pytest.raises(ConfigError, match=r"holds no prototype banks.*'random'"):
        build(oc, jax.devices()[:1])
    oc.swap.teacher_prototypes = "random"
    oc.swap.teacher_model.image.act = "gelu"
    with pytest.raises(ConfigError, match=r"teacher_model.image.act='gelu', the checkpoint's 'quick_gelu'"):
        build(oc, jax.devices()[:1])


def test_teacher_model_errors_name_the_key():
    base = student_config(**{"swap.teacher": "checkpoint", "swap.teacher_checkpoint": WEIGHTS})
    base.swap.teacher_model = student_config().model.copy_and_resolve_references()
    base.swap.teacher_model.embed_dim = 16
    cases = {
        "swap.teacher": ("ema", r"config.swap.teacher_model is set but config.swap.teacher='ema'"),
        "swap.teacher_prototypes": ("student", r"teacher_prototypes='student' needs config.swap.teacher_model.embed_dim"),
        "swap.teacher_model.text.vocab_size": (1000, r"teacher_model.text.vocab_size=1000 differs"),
        "swap.teacher_model.text.context_length": (4, r"teacher_model.text.context_length=4 is shorter"),
    }
    config_check.validate(base, 1)
    for key, (value, message) in cases.items():
        config = base.copy_and_resolve_references()
        config_base.set_dotted(config, key, value)
        with pytest.raises(ConfigError, match=message):
            config_check.validate(config, 1)
    ema = student_config(**{"swap.teacher": "ema", "swap.teacher_prototypes": "random"})
    with pytest.raises(ConfigError, match=r"teacher_prototypes='random'.*frozen teacher"):
        config_check.validate(ema, 1)


def test_the_teachers_own_forward_is_counted():
    """A teacher of its own towers costs its forward at its image size on the student's tokens."""
    from clus_jax.models.flops import towers_forward_flops

    swap, config = registry.get("swap"), student_config(**{"swap.teacher": "checkpoint", "swap.teacher_checkpoint": WEIGHTS})
    student = towers_forward_flops(config, 16)
    assert swap.no_grad_flops(config, 16) == student  # the student's shape
    config.swap.teacher_model = clus_config().model.copy_and_resolve_references()  # width 64, depth 2
    larger = swap.no_grad_flops(config, 16)
    assert larger == towers_forward_flops({"model": config.swap.teacher_model}, 16) > 2 * student
    config.swap.teacher_model.text.context_length = 77  # a longer context, but the same tokens run
    assert swap.no_grad_flops(config, 16) == larger
