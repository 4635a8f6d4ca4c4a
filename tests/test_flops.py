"""Analytic train-step FLOPs: a hand count for the tiny config, and agreement with XLA's cost analysis."""
import os

import jax
import pytest

from clus_jax import flops

import train_helpers as helpers  # registered by tests/conftest.py
tiny_config, random_batches = helpers.tiny_config, helpers.random_batches


def test_hand_count_tiny_config():
    # tiny_config: image 16 px, patch 4 -> 16 patches + CLS = 17 tokens, width 64, depth 2, MLP 256;
    # text: 8 tokens, width 64, depth 2, MLP 256, causal; embedding 32; batch 16; CLIP.
    c = tiny_config()
    c.model.pooled_last_block = False
    block = 4 * 64 * 64 + 2 * 64 * 256  # multiply-adds per token: QKV + output projection, two MLP layers
    image = (
        2 * 16 * (4 * 4 * 3) * 64  # patch embedding
        + 2 * (2 * 17 * block)  # two blocks of projections
        + 2 * (2 * 2 * 17 * 17 * 64)  # two blocks of QK^T and AV
        + 2 * 64 * 32  # projection to the shared embedding
    )
    text = 2 * (2 * 8 * block) + 2 * (2 * 2 * 8 * 8 * 64) + 2 * 64 * 32
    parts = flops.forward_flops_per_example(c.model)
    assert parts["total"] == image + text
    assert parts["image_patch_embed"] == 98304 and parts["text_attention"] == 32768
    logits = 2 * 16 * 16 * 32
    assert flops.train_step_flops(c, causal_attention_factor=1.0) == 3 * (16 * (image + text) + logits)
    # maxtext's convention halves the causal text attention only.
    halved = flops.train_step_flops(c)
    assert flops.train_step_flops(c, causal_attention_factor=1.0) - halved == 3 * 16 * 32768 / 2


def test_hand_count_pooled_last_block():
    # As above, but the last block of each tower computes keys and values for every token and the query,
    # the attention row, the output projection and the MLP for the pooled (CLS / EOT) token only.
    c = tiny_config()
    assert c.model.pooled_last_block
    block = 4 * 64 * 64 + 2 * 64 * 256

    def tower(tokens):  # depth 2: one full block, then the pooled last block, then the projection
        first = 2 * tokens * block + 2 * 2 * tokens * tokens * 64
        last = 2 * tokens * (2 * 64 * 64) + 2 * (2 * 64 * 64 + 2 * 64 * 256) + 2 * 2 * tokens * 64
        return first + last + 2 * 64 * 32

    image = 2 * 16 * (4 * 4 * 3) * 64 + tower(17)
    text = tower(8)
    parts = flops.forward_flops_per_example(c.model)
    assert parts["total"] == image + text


def test_objective_flops_and_mfu():
    c = tiny_config()
    assert flops.objective_forward_flops("clip", 16, c.model) == 2 * 16 * 16 * 32
    c.model.num_prototypes = (100, 50)
    assert flops.objective_forward_flops("swap", 16, c.model) == 2 * 2 * 16 * 32 * 150
    assert flops.objective_forward_flops("unknown", 16, c.model) == 0
    assert flops.mfu(1e12, 2.0, 1e12) == pytest.approx(0.5)


@pytest.mark.parametrize("size,pooling,pooled_last", [("mu", "cls", True), ("mu", "cls", False), ("nano", "gap", True),
                                                      ("mu", "map", True)])
def test_agrees_with_xla_cost_analysis(size, pooling, pooled_last):
    """XLA counts every op (normalisations, softmax, AdamW) on top of the matmuls: a little above, never below."""
    from clus_jax.parallel import multihost, partitioning
    from clus_jax.train.loop import build
    from clus_jax.train.state import create_train_state
    from clus_jax.train.step import build_train_step

    c = tiny_config(**{"model.image.size": size, "model.text.size": size, "model.image.pooling": pooling,
                       "model.pooled_last_block": pooled_last})
    devices = jax.devices()[:1]
    mesh, rules, objectives, model, tx, schedule = build(c, devices)
    obj_only = {name: obj for name, (obj, _) in objectives.items()}
    state, shardings = create_train_state(c, model, tx, obj_only, mesh, rules, materialize=False)
    step = build_train_step(c, model, tx, schedule, objectives, mesh, rules, shardings)
    batch = multihost.make_global_batch(random_batches(c, 1)[0], lambda nd: partitioning.batch_sharding(mesh, rules, nd))
    cost = step.jitted.lower(state, batch).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    analytic = flops.train_step_flops(c, causal_attention_factor=1.0)
    assert analytic <= cost["flops"] <= 1.25 * analytic, (cost["flops"], analytic)
