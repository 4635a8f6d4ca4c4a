"""``experiment.build`` derives the run from its objectives: batch fields they declare, parameters they own
(at ``params[<name>]``, sharded by their logical axes) and the towers they read (an unused tower is frozen
and never runs). Test-only objectives are registered for the module and removed afterwards."""
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from clus_jax.train import flops as train_flops
from clus_jax.data.fields import FieldSpec, image_field, text_field
from clus_jax.train.experiment import TOWER_PATTERNS, build
from clus_jax.objectives import registry
from clus_jax.objectives.registry import ConfigError
from clus_jax.train import optim

import tolerances  # registered by tests/conftest.py
import train_helpers as helpers  # registered by tests/conftest.py

LABELS = FieldSpec((3,), "int32")
SEEN_OUTPUTS = []  # what the image-only objective found in ctx.outputs while the step was traced


class Labelled(registry.Objective):
    """Declares an extra field: loss = -mean_i labels[i, 0] * <g_i, h_i>."""

    name = "test_labelled"

    def batch_fields(self, config):
        return {"labels": LABELS}

    def loss(self, ctx):
        w = ctx.batch["labels"][:, 0].astype(jnp.float32)
        cos = jnp.sum(ctx.outputs["image_emb"] * ctx.outputs["text_emb"], axis=-1)
        return -jnp.mean(w * cos), {}, ctx.state


class OtherLabels(registry.Objective):
    """Declares the same field name with another shape."""

    name = "test_other_labels"

    def batch_fields(self, config):
        return {"labels": FieldSpec((5,), "int32")}

    def loss(self, ctx):
        return jnp.zeros([]), {}, ctx.state


class Centres(registry.Objective):
    """Owns parameters: 8 centres [8, embed_dim] with the logical axes ('prototypes', 'proj')."""

    name = "test_centres"

    def init_params(self, rng, config):
        init = nn.with_logical_partitioning(nn.initializers.normal(1.0), ("prototypes", "proj"))
        return {"centres": init(rng, (8, int(config.model.embed_dim)))}

    def loss(self, ctx):
        c = ctx.params[self.name]["centres"]
        return jnp.mean(jnp.square(ctx.outputs["image_emb"] @ c.T - ctx.outputs["text_emb"] @ c.T)), {}, ctx.state


class ImageOnly(registry.Objective):
    """Reads the image tower only."""

    name = "test_image_only"

    def modalities(self, config):
        return ("image",)

    def loss(self, ctx):
        SEEN_OUTPUTS.append(sorted(ctx.outputs))
        return -jnp.mean(ctx.outputs["image_emb"][:, 0]), {}, ctx.state


TEST_OBJECTIVES = (Labelled, OtherLabels, Centres, ImageOnly)


@pytest.fixture(scope="module", autouse=True)
def test_objectives():
    for cls in TEST_OBJECTIVES:
        registry.register(cls)
    yield
    for cls in TEST_OBJECTIVES:
        registry._REGISTRY.pop(cls.name, None)


def config_with(objectives, **overrides):
    config = helpers.tiny_config("clip", **{"model.text.vocab_size": 64, "optim.warmup_steps": 0, **overrides})
    config.objectives = objectives
    return config


def host_outputs(exp, params, batch):
    out = jax.jit(lambda p, i, t: exp.model.apply({"params": exp.model_params(p)}, i, t))(
        params, batch["image"], batch["text"])
    return {k: np.asarray(v, np.float64) for k, v in out.items()}


# -- batch fields -----------------------------------------------------------------------------------------


@pytest.mark.slow  # each of these three compiles a sharded train step
def test_declared_field_reaches_fields_shardings_batches_and_the_loss():
    config = config_with({"clip": 1.0, "test_labelled": 0.5})
    exp = build(config)  # data=8
    assert exp.fields == {"image": image_field(16), "text": text_field(8), "labels": LABELS}
    assert exp.batch_shardings["labels"].spec == P(("data", "fsdp"), None)
    assert exp.batch_shardings["labels"].spec[0] == exp.batch_shardings["image"].spec[0]
    abstract = exp.abstract_batch(16)
    assert set(abstract) == {"image", "text", "labels"}
    assert abstract["labels"].shape == (16, 3) and abstract["labels"].dtype == np.int32
    assert abstract["labels"].sharding == exp.batch_shardings["labels"]
    dummy = exp.dummy_batch(4)
    assert dummy["labels"].shape == (4, 3) and dummy["labels"].dtype == np.int32 and not dummy["labels"].any()
    assert "labels" not in build(config_with({"clip": 1.0})).fields

    # The field's values reach the loss row by row, split over the 8 devices like the images.
    local = helpers.random_batches(config, 1, seed=1)[0]
    local["labels"] = np.random.default_rng(0).integers(0, 5, (16, 3)).astype(np.int32)
    local["undeclared"] = np.zeros((16,), np.float32)
    batch = exp.global_batch(local)
    assert set(batch) == {"image", "text", "labels"}  # declared fields only
    assert batch["labels"].sharding == exp.batch_shardings["labels"]
    state = exp.init_state()
    out = host_outputs(exp, jax.device_get(state["params"]), local)
    _, metrics = exp.step(state, batch)
    cos = np.sum(out["image_emb"] * out["text_emb"], axis=1)
    want = -np.mean(local["labels"][:, 0] * cos)
    # The step's towers run over 8 devices, host_outputs' on one: entries differ by reordered sums, at most e
    # (tolerances.network_atol as in tests/models/test_towers.py: 'mu' towers, 256-term sums, depth 3); a cosine
    # by e (|g|_1 + |h|_1), the loss by the label-weighted mean of that plus its own float32 mean of 16 terms.
    e = tolerances.network_atol(256, max(np.abs(out["image_emb"]).max(), np.abs(out["text_emb"]).max()), 3)
    w = np.abs(local["labels"][:, 0])
    atol = (np.mean(w * e * (np.abs(out["image_emb"]).sum(1) + np.abs(out["text_emb"]).sum(1)))
            + tolerances.gamma(16) * np.mean(w * np.abs(cos)))
    np.testing.assert_allclose(float(metrics["test_labelled/loss"]), want, rtol=0, atol=atol)
    assert atol < 0.1 * abs(-np.mean(np.roll(local["labels"][:, 0], 2) * cos) - want)  # labels a device off
    # The same program's total: 1.0 * clip + 0.5 * labelled, exact products (powers of two) and one rounding.
    total = float(metrics["clip/loss"]) + 0.5 * float(metrics["test_labelled/loss"])
    np.testing.assert_allclose(float(metrics["loss"]), total, rtol=0, atol=tolerances.U32 * abs(total))


def test_conflicting_field_declarations_fail_naming_the_objective():
    with pytest.raises(ConfigError, match=r"config\.objectives\.test_other_labels: batch field 'labels'"):
        build(config_with({"test_labelled": 1.0, "test_other_labels": 1.0}))


# -- parameters owned by an objective ---------------------------------------------------------------------


@pytest.mark.slow
def test_objective_parameters_live_at_their_name_sharded_by_their_axes():
    config = config_with({"clip": 1.0, "test_centres": 1.0}, **{"mesh.data": 2, "mesh.tensor": 4})
    exp = build(config)
    assert exp.abstract_state["params"]["test_centres"]["centres"].shape == (8, 32)
    assert exp.shardings["params"]["test_centres"]["centres"].spec == P("tensor")
    assert "test_centres" not in exp.model_params(exp.abstract_state["params"])
    state = exp.init_state()
    centres = state["params"]["test_centres"]["centres"]
    assert centres.sharding.spec == P("tensor") and len(centres.sharding.device_set) == 8
    before = np.asarray(jax.device_get(centres))
    # Optimizer moments follow the parameter.
    moments = [(optim.path_str(k), x) for k, x in jax.tree_util.tree_leaves_with_path(state["opt_state"])
               if "test_centres" in optim.path_str(k)]
    assert len(moments) == 2 and all(x.sharding.spec == P("tensor") for _, x in moments)
    new, metrics = exp.step(state, exp.global_batch(helpers.random_batches(config, 1)[0]))
    assert float(metrics["test_centres/loss"]) > 0
    assert np.any(np.asarray(jax.device_get(new["params"]["test_centres"]["centres"])) != before)  # it trains
    # The init key depends on the objective's name only, not on which other objectives run.
    other = build(config_with({"test_centres": 1.0, "siglip": 1.0}, **{"model.logit_bias_init": -10.0}))
    np.testing.assert_array_equal(jax.device_get(other.init_state()["params"]["test_centres"]["centres"]), before)


# -- an image-only objective ------------------------------------------------------------------------------


@pytest.mark.slow
def test_image_only_objective_freezes_and_skips_the_text_tower():
    config = config_with({"test_image_only": 1.0}, **{"mesh.data": 1})
    exp = build(config, jax.devices()[:1])
    assert exp.modalities == ("image",)
    assert exp.fields == {"image": image_field(16)} and set(exp.abstract_batch()) == {"image"}
    assert exp.param_groups[0] == (TOWER_PATTERNS["text"], {"frozen": True})
    opt_paths = [optim.path_str(k) for k, _ in jax.tree_util.tree_leaves_with_path(exp.abstract_state["opt_state"])]
    assert not [k for k in opt_paths if "/text/" in k or "/text_proj/" in k]  # no optimizer state
    assert [k for k in opt_paths if "/image/" in k]

    state = exp.init_state()
    before = jax.device_get(state["params"])
    SEEN_OUTPUTS.clear()
    new, metrics = exp.step(state, exp.global_batch(helpers.random_batches(config, 1)[0]))
    assert SEEN_OUTPUTS == [["image_emb", "logit_scale"]]  # the step's model call never ran the text tower
    after = jax.device_get(new["params"])
    for key in ("text", "text_proj"):
        for a, b in zip(jax.tree.leaves(after[key]), jax.tree.leaves(before[key])):
            np.testing.assert_array_equal(a, b)
    assert any(np.any(a != b) for a, b in zip(jax.tree.leaves(after["image"]), jax.tree.leaves(before["image"])))

    # Nor does the compiled program: its FLOPs are the image tower's, well below the text tower's share.
    cost = exp.step.jitted.lower(exp.abstract_state, exp.abstract_batch()).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    image_only = exp.train_step_flops(causal_attention_factor=1.0)
    both = train_flops.train_step_flops(config, causal_attention_factor=1.0, include_objectives=False)
    assert image_only < both
    assert image_only <= cost["flops"] <= 1.25 * image_only, (cost["flops"], image_only, both)


def test_bad_param_group_is_named_by_its_config_index_when_a_tower_is_unused():
    config = config_with({"test_image_only": 1.0}, **{"mesh.data": 1})
    config.param_groups = [(r"^image/", {"lr_multiplier": 2.0})]
    with pytest.raises(ConfigError, match=re.escape("config.param_groups[0]")):
        build(config, jax.devices()[:1])
