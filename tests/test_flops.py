"""Analytic train-step FLOPs: a hand count for the tiny config, and agreement with XLA's cost analysis."""
import jax
import pytest

from clus_jax.models import flops
from clus_jax.train import flops as train_flops
from clus_jax.objectives import registry

import train_helpers as helpers  # registered by tests/conftest.py
tiny_config = helpers.tiny_config


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
    assert train_flops.train_step_flops(c, causal_attention_factor=1.0) == 3 * (16 * (image + text) + logits)
    assert train_flops.train_step_flops(c, causal_attention_factor=1.0, include_objectives=False) == 3 * 16 * (image + text)
    # maxtext's convention halves the causal text attention only.
    halved = train_flops.train_step_flops(c)
    assert train_flops.train_step_flops(c, causal_attention_factor=1.0) - halved == 3 * 16 * 32768 / 2


@pytest.mark.parametrize("objective", ["clip", "siglip", "clip_reg"])
def test_contrastive_logits_are_counted(objective):
    """One [B, B] logit matrix per contrastive objective: 2 B^2 D on top of the towers."""
    c = tiny_config(objective)
    logits = 2 * 16 * 16 * 32
    assert registry.get(objective).forward_flops(c, 16) == logits
    towers = train_flops.train_step_flops(c, causal_attention_factor=1.0, include_objectives=False)
    assert train_flops.train_step_flops(c, causal_attention_factor=1.0) == towers + 3 * logits


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
    assert registry.get("clip").forward_flops(c, 16) == 2 * 16 * 16 * 32
    c.swap.num_prototypes = (100, 50)
    assert registry.get("swap").forward_flops(c, 16) == 2 * 2 * 16 * 32 * 150
    assert registry.Objective().forward_flops(c, 16) == 0  # an objective that declares none counts none
    assert train_flops.mfu(1e12, 2.0, 1e12) == pytest.approx(0.5)


def test_only_the_towers_in_use_count():
    c = tiny_config()
    parts = flops.forward_flops_per_example(c.model, causal_attention_factor=1.0)
    image = sum(v for k, v in parts.items() if k.startswith("image_"))
    both = train_flops.train_step_flops(c, causal_attention_factor=1.0, include_objectives=False)
    image_only = train_flops.train_step_flops(c, causal_attention_factor=1.0, include_objectives=False, modalities=("image",))
    assert both == 3 * 16 * parts["total"]
    assert image_only == 3 * 16 * image < both


# The fast tier compiles one tower; the other poolings, the full last block and the stem run in the slow tier.
@pytest.mark.parametrize("size,pooling,pooled_last,stem", [
    ("mu", "cls", True, ()),
    pytest.param("mu", "cls", False, (), marks=pytest.mark.slow),
    pytest.param("nano", "gap", True, (), marks=pytest.mark.slow),
    pytest.param("mu", "map", True, (), marks=pytest.mark.slow),
    pytest.param("mu", "cls", True, (8, 16), marks=pytest.mark.slow)])
def test_agrees_with_xla_cost_analysis(size, pooling, pooled_last, stem):
    """XLA counts every op (normalisations, softmax, AdamW) on top of the matmuls: a little above, never below."""
    from clus_jax.train.experiment import build

    # A small vocabulary: the gather and scatter-add of a 49408-row token table are not matmuls.
    c = tiny_config(**{"model.image.size": size, "model.text.size": size, "model.image.pooling": pooling,
                       "model.pooled_last_block": pooled_last, "model.text.vocab_size": 64,
                       "model.image.conv_stem": stem})
    exp = build(c, jax.devices()[:1])
    cost = exp.step.jitted.lower(exp.abstract_state, exp.abstract_batch()).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    analytic = train_flops.train_step_flops(c, causal_attention_factor=1.0)
    assert exp.train_step_flops(causal_attention_factor=1.0) == analytic
    assert analytic <= cost["flops"] <= 1.25 * analytic, (cost["flops"], analytic)
