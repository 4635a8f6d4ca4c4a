"""Train steps on meshes (data=8), (data=4, fsdp=2), (data=2, tensor=4) give one device's gradients, losses
and parameters, with a model whose attention heads, MLP and vocabulary are really split over 'tensor'.

Gradients are compared directly, not through Adam (which divides a gradient by its own scale, so a gradient
that is 8x too large moves the parameters the same way): the optimizer built by ``experiment.build`` is
wrapped by a first transformation that records the gradient it is given into the optimizer state. The
step, its loss, its shard_map islands, its backward pass and the real optimizer all run unchanged.
"""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from clus_jax.experiment import build
from clus_jax.objectives import prototypes
from clus_jax.train import optim

import train_helpers as helpers  # registered by tests/conftest.py
from train_helpers import recording  # noqa: F401 (a pytest fixture)

MESHES = [dict(data=8, fsdp=1, tensor=1), dict(data=4, fsdp=2, tensor=1), dict(data=2, fsdp=1, tensor=4)]
STEPS = 2


def sharded_config(objective):
    """Width 64 with 4 heads and MLP 256 in both towers, vocabulary 64: all divisible by tensor=4.

    'clip_default_towers' is CLIP with what config_base adds to the mechanism tests' towers: a convolutional
    stem (replicated kernels on batch-split images) and the text tower's learning-rate group."""
    tower = {"heads": 4, "width": 64, "mlp_dim": 256}
    overrides = {f"model.{t}.{k}": v for t in ("image", "text") for k, v in tower.items()}
    overrides.update({"model.text.vocab_size": 64, "optim.warmup_steps": 0})
    if objective == "clip_default_towers":
        from clus_jax import config_base

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


def run_steps(exp, batches, start_states=None):
    """Per step: (loss, logged grad_norm, recorded gradients, host state before the step); final host state.

    With ``start_states``, step t starts from ``start_states[t]`` (placed in this mesh's shardings) instead
    of from the previous step's result, so the gradients of two meshes are taken at the same parameters.
    """
    state = exp.init_state()
    steps = []
    for t, local in enumerate(batches):
        if start_states is not None:
            state = jax.device_put(start_states[t], exp.shardings)
        before = jax.device_get(state)
        state, metrics = exp.step(state, exp.global_batch(local))
        grads = state["opt_state"][0].grads
        steps.append((float(metrics["loss"]), float(metrics["grad_norm"]), jax.device_get(grads), before))
    return steps, jax.device_get(state)


def global_norm(tree):
    return float(np.sqrt(sum(np.sum(np.square(np.asarray(x, np.float64))) for x in jax.tree.leaves(tree))))


def assert_gradients_match(got, want, what):
    assert jax.tree.structure(got) == jax.tree.structure(want), what
    for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
        scale = float(np.max(np.abs(w))) or 1.0  # leaves whose true gradient is ~0 are rounding noise
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5 * scale, err_msg=f"{what} grad{jax.tree_util.keystr(path)}")


def assert_tensor_parallel(exp):
    """Heads, MLP and vocabulary are split over 'tensor' on the (data=2, tensor=4) mesh."""
    params = exp.shardings["params"]
    for tower in ("image", "text"):
        block = params[tower]["encoder"]["block_0"]
        assert block["attn"]["qkv_kernel"].spec == P(None, None, "tensor"), tower  # (embed, 3, heads, kv)
        assert block["attn"]["out_kernel"].spec == P("tensor"), tower  # (heads, kv, embed)
        assert block["mlp"]["fc1"]["kernel"].spec == P(None, "tensor"), tower  # (embed, mlp)
    assert "tensor" in tuple(params["text"]["token_embed"].spec), params["text"]["token_embed"].spec


@pytest.mark.parametrize("objective", ["clip", "siglip", "clip_reg", "swap", "clip_default_towers"])
def test_meshes_match_one_device(objective, recording):
    config = sharded_config(objective)
    batches = helpers.random_batches(config, STEPS)
    config.mesh.update(dict(data=1, fsdp=1, tensor=1))
    ref_steps, ref_state = run_steps(build(config, jax.devices()[:1]), batches)
    for loss, grad_norm, grads, _ in ref_steps:
        assert np.isfinite(loss) and grad_norm > 0
        np.testing.assert_allclose(grad_norm, global_norm(grads), rtol=1e-5)  # the logged norm is of these
    if objective == "swap":
        assert set(ref_steps[0][2][prototypes.PARAMS_KEY]) == {"bank_0", "bank_1"}
        assert int(ref_steps[1][3]["objective_states"]["swap"]["queue"]["filled"]) == 1  # step 1 uses the queue
    if objective == "clip_default_towers":
        assert {"stem_conv_0", "stem_conv_1"} <= set(ref_steps[0][2]["image"])  # the stem has gradients
    ref_starts = [before for *_, before in ref_steps]
    for mesh in MESHES:
        config.mesh.update(mesh)
        # Each step from the one-device run's state: the same loss and the same gradient, leaf by leaf.
        exp = build(config, jax.devices())
        steps, _ = run_steps(exp, batches, start_states=ref_starts)
        if mesh["tensor"] == 4:
            assert_tensor_parallel(exp)
            if objective == "swap":
                assert exp.shardings["params"][prototypes.PARAMS_KEY]["bank_0"].spec == P("tensor")
        for t, ((loss, grad_norm, grads, _), (ref_loss, ref_norm, ref_grads, _)) in enumerate(zip(steps, ref_steps)):
            what = f"{objective} {mesh} step {t}"
            np.testing.assert_allclose(loss, ref_loss, rtol=1e-5, err_msg=what)
            np.testing.assert_allclose(grad_norm, ref_norm, rtol=1e-5, err_msg=what)
            assert_gradients_match(grads, ref_grads, what)
        # Free-running from this mesh's own initial state: the same losses and parameters. Adam divides by
        # sqrt(v): for near-zero gradients, reduction-order rounding between meshes is amplified up to a
        # small fraction of one step (lr = 3e-3), hence the absolute tolerance.
        free_steps, state = run_steps(exp, batches)
        np.testing.assert_allclose([s[0] for s in free_steps], [s[0] for s in ref_steps], rtol=1e-5, err_msg=str(mesh))
        for part in ("params", "objective_states"):
            for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(state[part]), jax.tree.leaves(ref_state[part])):
                np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-5, err_msg=f"{mesh} {part}{jax.tree_util.keystr(path)}")


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
