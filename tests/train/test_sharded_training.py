"""A few train steps on meshes (data=8), (data=4, fsdp=2), (data=2, tensor=4) equal one device's."""
import os

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from clus_jax.parallel import multihost, partitioning
from clus_jax.train.loop import build
from clus_jax.train.state import create_train_state
from clus_jax.train.step import build_train_step

import train_helpers as helpers  # registered by tests/conftest.py


def run_steps(config, devices, batches):
    mesh, rules, objectives, model, tx, schedule = build(config, devices)
    state, shardings = create_train_state(config, model, tx, {k: o for k, (o, _) in objectives.items()}, mesh, rules)
    step = build_train_step(config, model, tx, schedule, objectives, mesh, rules, shardings)
    losses = []
    for local in batches:
        batch = multihost.make_global_batch(local, lambda nd: partitioning.batch_sharding(mesh, rules, nd))
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    return np.array(losses), jax.device_get(state["params"])


MESHES = [dict(data=8, fsdp=1, tensor=1), dict(data=4, fsdp=2, tensor=1), dict(data=2, fsdp=1, tensor=4)]


@pytest.mark.parametrize("objective", ["clip", "siglip", "clip_reg"])
def test_meshes_match_one_device(objective):
    config = helpers.tiny_config(objective)
    batches = helpers.random_batches(config, 3)
    config.mesh.update(dict(data=1, fsdp=1, tensor=1))
    ref_losses, ref_params = run_steps(config, jax.devices()[:1], batches)
    assert np.all(np.isfinite(ref_losses))
    for mesh in MESHES:
        config.mesh.update(mesh)
        losses, params = run_steps(config, jax.devices(), batches)
        np.testing.assert_allclose(losses, ref_losses, rtol=1e-5, err_msg=str(mesh))
        # Adam divides by sqrt(v): for near-zero gradients, reduction-order rounding between meshes is
        # amplified up to a small fraction of one step (lr = 3e-3), hence the absolute tolerance.
        for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(ref_params)):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-5, err_msg=f"{mesh} {jax.tree_util.keystr(path)}")


def test_parameters_are_actually_sharded():
    """FSDP and tensor axes split the big matrices; nothing silently stays replicated."""
    config = helpers.tiny_config("clip")
    config.mesh.update(dict(data=2, fsdp=2, tensor=2))
    mesh, rules, objectives, model, tx, _ = build(config)
    _, shardings = create_train_state(config, model, tx, {k: o for k, (o, _) in objectives.items()}, mesh, rules, materialize=False)
    mlp = shardings["params"]["image"]["encoder"]["block_0"]["mlp"]["fc1"]["kernel"]
    assert mlp.spec == P("fsdp", "tensor")
    qkv = shardings["params"]["text"]["encoder"]["block_0"]["attn"]["qkv_kernel"]
    assert qkv.spec == P("fsdp", None, "tensor")
    mu = shardings["opt_state"][1][0].mu["image"]["encoder"]["block_0"]["mlp"]["fc1"]["kernel"]
    assert mu.spec == P("fsdp", "tensor")  # optimizer moments follow their parameters
