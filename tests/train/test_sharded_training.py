"""Train steps on meshes (data=8), (data=4, fsdp=2), (data=2, tensor=4) give one device's gradients, losses
and parameters, with a model whose attention heads, MLP and vocabulary are really split over 'tensor'.

Gradients are compared directly, not through Adam (which divides a gradient by its own scale, so a gradient
that is 8x too large moves the parameters the same way): the optimizer built by ``experiment.build`` is
wrapped by a first transformation that records the gradient it is given into the optimizer state. The
step, its loss, its shard_map islands, its backward pass and the real optimizer all run unchanged.

A run on a mesh equals the one-device run by induction: the same initial state, and each step, from the
one-device run's state, gives the same loss, gradients, parameters and objective state. Tolerances are
derived from rounding-error bounds (``train_helpers``, ``tests/tolerances.py``).
"""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from clus_jax.train.experiment import build
from clus_jax.objectives import prototypes
from clus_jax.train import optim

import tolerances  # registered by tests/conftest.py
import train_helpers as helpers  # registered by tests/conftest.py
from train_helpers import recording  # noqa: F401 (a pytest fixture)

MESHES = [dict(data=8, fsdp=1, tensor=1), dict(data=4, fsdp=2, tensor=1), dict(data=2, fsdp=1, tensor=4)]
STEPS = 2


def longest_reduction(objective):
    """A weight gradient's sum over the batch's image tokens: 16 x 17, or 16 x 8 x 8 stem positions."""
    return 16 * 8 * 8 if objective == "clip_default_towers" else helpers.LONGEST_REDUCTION


def sharded_config(objective):
    """Width 64 with 4 heads and MLP 256 in both towers, vocabulary 64: all divisible by tensor=4.

    'clip_default_towers' is CLIP with what config_base adds to the mechanism tests' towers: a convolutional
    stem (replicated kernels on batch-split images) and the text tower's learning-rate group."""
    tower = {"heads": 4, "width": 64, "mlp_dim": 256}
    overrides = {f"model.{t}.{k}": v for t in ("image", "text") for k, v in tower.items()}
    # Adam's eps bounds how far it moves gradients' last bits (train_helpers.ADAM_EPS).
    overrides.update({"model.text.vocab_size": 64, "optim.warmup_steps": 0, "optim.eps": helpers.ADAM_EPS})
    if objective == "clip_default_towers":
        from clus_jax.config import base as config_base

        config = helpers.tiny_config("clip", **overrides, **{"model.image.conv_stem": (8, 16)})
        config.param_groups = list(config_base.base_config().param_groups)
        return config
    if objective == "swap":
        overrides.update({"swap.num_prototypes": (16, 6), "swap.teacher": "ema", "swap.teacher_momentum": 0.9,
                          "swap.queue_length": 16, "swap.queue_start_step": 0})
    config = helpers.tiny_config(objective, **overrides)
    if objective == "swap":
        config.objectives = {"swap": 1.0}  # the swap loss alone, so its gradient is not diluted by CLIP's
    return config


def run_steps(exp, batches, start_states):
    """Per step: (loss, logged grad_norm, recorded gradients, host state before the step, host state after).

    Step t starts from ``start_states[t]`` (placed in this mesh's shardings), or from the previous step's
    result where that is None, so the gradients of two meshes are taken at the same parameters.
    """
    state = exp.init_state()
    steps = []
    for t, local in enumerate(batches):
        if start_states[t] is not None:
            state = jax.device_put(start_states[t], exp.shardings)
        before = jax.device_get(state)
        state, metrics = exp.step(state, exp.global_batch(local))
        grads = state["opt_state"][0].grads
        steps.append((float(metrics["loss"]), float(metrics["grad_norm"]), jax.device_get(grads), before,
                      jax.device_get(state)))
    return steps


def assert_gradients_match(got, want, what, n):
    assert jax.tree.structure(got) == jax.tree.structure(want), what
    for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
        # ~3e-4 of the leaf's largest entry (train_helpers.grad_atol); a gradient not averaged over devices is 8x off.
        np.testing.assert_allclose(g, w, rtol=0, atol=helpers.grad_atol(w, n),
                                   err_msg=f"{what} grad{jax.tree_util.keystr(path)}")


def assert_tensor_parallel(exp):
    """Heads, MLP and vocabulary are split over 'tensor' on the (data=2, tensor=4) mesh."""
    params = exp.shardings["params"]
    for tower in ("image", "text"):
        block = params[tower]["encoder"]["block_0"]
        assert block["attn"]["qkv_kernel"].spec == P(None, None, "tensor"), tower  # (embed, 3, heads, kv)
        assert block["attn"]["out_kernel"].spec == P("tensor"), tower  # (heads, kv, embed)
        assert block["mlp"]["fc1"]["kernel"].spec == P(None, "tensor"), tower  # (embed, mlp)
    assert "tensor" in tuple(params["text"]["token_embed"].spec), params["text"]["token_embed"].spec


# The fast tier runs clip_reg: the CLIP loss, the same towers, plus an elementwise term, so plain CLIP on
# these towers would compile the same islands again; the others compile in the slow tier.
@pytest.mark.parametrize("objective", [pytest.param("siglip", marks=pytest.mark.slow), "clip_reg",
                                       pytest.param("swap", marks=pytest.mark.slow),
                                       pytest.param("clip_default_towers", marks=pytest.mark.slow)])
def test_meshes_match_one_device(objective, recording):
    config = sharded_config(objective)
    batches = helpers.random_batches(config, STEPS)
    config.mesh.update(dict(data=1, fsdp=1, tensor=1))
    ref_steps = run_steps(build(config, jax.devices()[:1]), batches, [None] * STEPS)
    n = longest_reduction(objective)
    for loss, grad_norm, grads, *_ in ref_steps:
        assert np.isfinite(loss) and grad_norm > 0
        # the logged norm is of these (float32 against float64)
        np.testing.assert_allclose(grad_norm, helpers.global_norm(grads), rtol=helpers.norm_rtol(grads))
    if objective == "swap":
        assert set(ref_steps[0][2][prototypes.PARAMS_KEY]) == {"bank_0", "bank_1"}
        assert int(ref_steps[1][3]["objective_states"]["swap"]["queue"]["filled"]) == 1  # step 1 uses the queue
    if objective == "clip_default_towers":
        assert {"stem_conv_0", "stem_conv_1"} <= set(ref_steps[0][2]["image"])  # the stem has gradients
    ref_starts = [before for *_, before, _ in ref_steps]
    for mesh in MESHES:
        config.mesh.update(mesh)
        exp = build(config, jax.devices())
        # The mesh's own initial state is the one-device one: elementwise initialisers on the same random
        # bits, compiled for another sharding (a few roundings each: 16 u).
        init = jax.device_get(exp.init_state())
        for part in ("params", "objective_states"):
            for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(init[part]),
                                    jax.tree.leaves(ref_starts[0][part])):
                np.testing.assert_allclose(a, b, rtol=16 * tolerances.U32, atol=tolerances.FLUSHED,
                                           err_msg=f"{mesh} init {part}{jax.tree_util.keystr(path)}")
        # Each step from the one-device run's state: the same loss, gradient, parameters and objective state.
        steps = run_steps(exp, batches, start_states=ref_starts)
        if mesh["tensor"] == 4:
            assert_tensor_parallel(exp)
            if objective == "swap":
                assert exp.shardings["params"][prototypes.PARAMS_KEY]["bank_0"].spec == P("tensor")
        for t, (got, ref) in enumerate(zip(steps, ref_steps)):
            (loss, grad_norm, grads, _, after), (ref_loss, ref_norm, ref_grads, _, ref_after) = got, ref
            what = f"{objective} {mesh} step {t}"
            np.testing.assert_allclose(loss, ref_loss, rtol=0, atol=helpers.loss_atol(ref_loss, n), err_msg=what)
            norm_atol = helpers.grad_norm_atol(ref_grads, n)
            np.testing.assert_allclose(grad_norm, ref_norm, rtol=0, atol=norm_atol, err_msg=what)
            assert_gradients_match(grads, ref_grads, what, n)
            # Adam's step on gradients that differ that much (train_helpers.updated_params_atol): about lr times
            # their relative difference, a full step only for entries within it of 0; a wrong moment moves ~lr.
            params_atol = helpers.updated_params_atol(ref_grads, ref_after["params"], config.optim, n=n)
            for (path, a), b, atol in zip(jax.tree_util.tree_leaves_with_path(after["params"]),
                                          jax.tree.leaves(ref_after["params"]), params_atol):
                helpers.assert_within(a, b, atol, err_msg=f"{what} params{jax.tree_util.keystr(path)}")
            helpers.assert_states_close(after["objective_states"], ref_after["objective_states"], params_atol,
                                        ref_after["params"], f"{what} objective_states")


def test_parameters_are_actually_sharded():
    """FSDP and tensor axes split the big matrices; nothing silently stays replicated."""
    config = helpers.tiny_config("clip")
    config.mesh.update(dict(data=2, fsdp=2, tensor=2))
    exp = build(config)
    shardings = exp.shardings
    mlp = shardings["params"]["image"]["encoder"]["block_0"]["mlp"]["fc1"]["kernel"]
    assert mlp.spec == P("fsdp", "tensor")
    qkv = shardings["params"]["text"]["encoder"]["block_0"]["attn"]["qkv_kernel"]
    assert qkv.spec == P("fsdp", None, "tensor")
    mu = shardings["opt_state"][1][0].mu["image"]["encoder"]["block_0"]["mlp"]["fc1"]["kernel"]
    assert mu.spec == P("fsdp", "tensor")  # optimizer moments follow their parameters
