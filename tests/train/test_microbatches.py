"""``config.microbatches = M`` (GradCache) gives the single-batch step: the same per-step losses, the same
gradients leaf by leaf (recorded in front of the real optimizer) and the same objective state, on one device
and on 8 fake devices, for clip (M = 8, and 4 on data=2 x tensor=4), siglip (M = 4, and 2 on data=8) and swap
with an EMA teacher and a queue (M = 2, and 4 on data=2 x tensor=4), and brivl (M = 2), whose momentum towers
run through the micro-batched ``ctx.apply_model``.

Every micro-batched step starts from the state the single-batch run had before that step, so both compute
the gradient at the same parameters; the single-batch step (M = 1) is the oracle. Micro-batches reorder the
step's sums: tolerances derived from rounding-error bounds (``train_helpers``, ``tests/tolerances.py``).
"""

import os

import jax
import numpy as np
import pytest

from clus_jax.train.experiment import build
from clus_jax.objectives.registry import ConfigError
from clus_jax.train import gradcache

import train_helpers as helpers  # registered by tests/conftest.py
from train_helpers import recording  # noqa: F401 (a pytest fixture)

STEPS = 2


def config_for(objective, microbatches=1, mesh=None):
    # Adam's eps bounds how far it moves gradients' last bits (train_helpers.ADAM_EPS).
    overrides = {"optim.warmup_steps": 0, "microbatches": microbatches, "model.text.vocab_size": 64,
                 "optim.eps": helpers.ADAM_EPS}
    if objective == "swap":
        overrides.update({"swap.num_prototypes": (16, 6), "swap.teacher": "ema", "swap.teacher_momentum": 0.9,
                          "swap.queue_length": 16, "swap.queue_start_step": 0})
    if objective == "brivl":
        overrides["brivl.queue_length"] = 32
    config = helpers.tiny_config(objective, **overrides)
    if objective == "swap":
        config.objectives = {"swap": 1.0}
    config.mesh.update(mesh or dict(data=1, fsdp=1, tensor=1))
    return config


def run_steps(exp, batches, start_states=None):
    """Per step: (loss, recorded gradients, host state before, host state after)."""
    state = exp.init_state()
    out = []
    for t, local in enumerate(batches):
        if start_states is not None:
            state = jax.device_put(start_states[t], exp.shardings)
        before = jax.device_get(state)
        state, metrics = exp.step(state, exp.global_batch(local))
        out.append((float(metrics["loss"]), jax.device_get(state["opt_state"][0].grads), before,
                    jax.device_get(state)))
    return out


def assert_gradients_close(got, want, what):
    """Leaf by leaf within train_helpers.grad_atol, ~3e-4 of the leaf's largest entry (a micro-batch dropped
    or counted twice moves a gradient by ~1/M of itself)."""
    assert jax.tree.structure(got) == jax.tree.structure(want), what
    for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(g, w, rtol=0, atol=helpers.grad_atol(w),
                                   err_msg=f"{what}{jax.tree_util.keystr(path)}")


def assert_steps_match(steps, ref_steps, what, optim_cfg):
    for t, ((loss, grads, _, after), (ref_loss, ref_grads, _, ref_after)) in enumerate(zip(steps, ref_steps)):
        np.testing.assert_allclose(loss, ref_loss, rtol=0, atol=helpers.loss_atol(ref_loss),
                                   err_msg=f"{what} step {t} loss")
        assert_gradients_close(grads, ref_grads, f"{what} step {t} grad")
        # The state after the step: queue rows computed at the same parameters, and an EMA teacher of the
        # parameters Adam updated with gradients that differ that much (train_helpers.updated_params_atol).
        params_atol = helpers.updated_params_atol(ref_grads, ref_after["params"], optim_cfg)
        helpers.assert_states_close(after["objective_states"], ref_after["objective_states"], params_atol,
                                    ref_after["params"], f"{what} step {t} state")


MESH_8 = dict(data=8, fsdp=1, tensor=1)
MESH_2X4 = dict(data=2, fsdp=1, tensor=4)  # heads, MLP, vocabulary and swap banks split over 'tensor'


@pytest.mark.slow
@pytest.mark.parametrize("objective, sizes, meshes", [
    # Each M of 2, 4, 8 is covered by some objective on one device; compiles are what this test costs.
    ("clip", (8,), ((MESH_2X4, 4),)),
    ("siglip", (4,), ((MESH_8, 2),)),
    ("swap", (2,), ((MESH_2X4, 4),)),
    ("brivl", (2,), ()),  # momentum towers run micro-batched through ctx.apply_model
])
def test_microbatches_equal_single_batch(objective, sizes, meshes, recording):
    batches = helpers.random_batches(config_for(objective), STEPS)
    one = jax.devices()[:1]
    ref = run_steps(build(config_for(objective), one), batches)
    assert all(np.isfinite(loss) for loss, *_ in ref)
    if objective == "swap":  # step 1 reads the queue written by step 0, and the EMA teacher has moved
        assert int(ref[1][2]["objective_states"]["swap"]["queue"]["filled"]) == 1
    starts = [before for _, _, before, _ in ref]
    optim_cfg = config_for(objective).optim
    for m in sizes:
        steps = run_steps(build(config_for(objective, m), one), batches, starts)
        assert_steps_match(steps, ref, f"{objective} M={m}", optim_cfg)
    for mesh, m in meshes:  # 8 fake devices
        exp = build(config_for(objective, m, mesh), jax.devices())
        assert_steps_match(run_steps(exp, batches, starts), ref, f"{objective} {mesh} M={m}", optim_cfg)


FULL_MATRIX = [(objective, (2, 4, 8), ((MESH_8, 2), (MESH_2X4, 2), (MESH_2X4, 4), (MESH_2X4, 8)))
               for objective in ("clip", "siglip", "swap")]


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("CLUS_JAX_FULL_MICROBATCH_MATRIX") != "1",
                    reason="every M on every mesh (21 compiles): CLUS_JAX_FULL_MICROBATCH_MATRIX=1")
@pytest.mark.parametrize("objective, sizes, meshes", FULL_MATRIX)
def test_every_microbatch_count_on_every_mesh(objective, sizes, meshes, recording):
    """M = 2, 4, 8 on one device and on 8 fake devices (data=8, and data=2 x tensor=4) against M = 1; the
    suite's test above runs a cheaper subset of this matrix."""
    test_microbatches_equal_single_batch(objective, sizes, meshes, recording)


def test_split_takes_rows_of_every_device():
    """Micro-batch i holds rows i*b..(i+1)*b-1 of each device's share, and merge inverts split."""
    micro = gradcache.Microbatches(num=2, batch_size=8, shards=2)
    x = np.arange(8)
    split = np.asarray(micro.split(x))
    # Only moves values: exact.
    np.testing.assert_array_equal(split, [[0, 1, 4, 5], [2, 3, 6, 7]])
    np.testing.assert_array_equal(np.asarray(micro.merge(split)), x)


def test_microbatches_validated():
    config = config_for("clip", 3)  # batch 16 on one device
    with pytest.raises(ConfigError, match=r"config\.microbatches=3"):
        build(config, jax.devices()[:1])
    config = config_for("clip", 4, dict(data=8, fsdp=1, tensor=1))  # 16 rows over 8 devices: 2 per device
    with pytest.raises(ConfigError, match=r"config\.microbatches=4.*data-parallel size 8"):
        build(config, jax.devices())
    config = config_for("clip", 0)
    with pytest.raises(ConfigError, match=r"config\.microbatches=0"):
        build(config, jax.devices()[:1])


def compiled_temp_bytes(config):
    exp = build(config, jax.devices()[:1])
    with jax.set_mesh(exp.mesh):
        compiled = exp.step.jitted.lower(exp.abstract_state, exp.abstract_batch()).compile()
    return compiled.memory_analysis().temp_size_in_bytes


@pytest.mark.slow
def test_temporaries_do_not_grow_with_the_global_batch():
    """Batch 64 in 8 micro-batches needs at most 1.3x the temporaries of batch 8 (one batch of 64: ~6x)."""
    small = compiled_temp_bytes(helpers.tiny_config("clip", batch_size=8, microbatches=1, **{"model.text.vocab_size": 64}))
    large = compiled_temp_bytes(helpers.tiny_config("clip", batch_size=64, microbatches=8, **{"model.text.vocab_size": 64}))
    assert large <= 1.3 * small, (large, small)
