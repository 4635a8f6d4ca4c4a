"""Every config under configs/ loads, documents its command and passes validation; short runs train."""
import glob
import os

import numpy as np
import pytest

from clus_jax.config import base as config_base
from clus_jax.config import check as config_check
from clus_jax.train import loop
from clus_jax.train.metrics_writer import read_metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(REPO, "configs", "*.py")))


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_config_is_runnable_documentation(path):
    with open(path) as f:
        source = f.read()
    doc = source.split('"""')[1]
    assert "python -m clus_jax.train --config configs/" in doc, "docstring must give the exact command"
    assert "Expected" in doc or "expected" in doc
    config = config_base.load_config(path)
    config_check.validate(config, num_devices=8)


def test_text_lr_mult_argument_replaces_the_default_text_group():
    """configs/clip.py:text_lr_mult=X is the ablation's one switch; the step reads the group it writes
    (tests/train/test_param_groups.py checks the update at the default 0.03)."""
    assert config_base.load_config("configs/clip.py").param_groups == [(r"^text(_proj)?/", {"lr_mult": 0.03})]
    config = config_base.load_config("configs/clip.py:text_lr_mult=0.3,steps=400")
    assert config.param_groups == [(r"^text(_proj)?/", {"lr_mult": 0.3})]
    assert config.total_steps == 400


def test_default_run_towers_batch_and_crop_reach_the_model_and_the_pipeline():
    """configs/clip.py (the quick start): batch 64, no random crop, and the nano towers (an image MLP of 2x
    the width, 2 text blocks) read where they are used, in the built model's parameters (the crop where
    sample_crop_box reads it: tests/data/test_transforms.py); a named size= / text_size= takes every
    dimension from the name, whatever the tower had before."""
    import jax

    from clus_jax.train.experiment import build

    config = config_base.load_config("configs/clip.py")
    assert config.batch_size == 64 and config.data.min_crop_scale == 1.0
    config.data.source = "synthetic"
    config.evals.run = "none"
    params = build(config, jax.devices()[:1]).abstract_state["params"]
    image, text = params["image"]["encoder"], params["text"]["encoder"]
    assert sorted(image) == [f"block_{i}" for i in range(4)] and sorted(text) == ["block_0", "block_1"]
    assert image["block_0"]["mlp"]["fc1"]["kernel"].shape == (128, 256)
    assert text["block_0"]["mlp"]["fc1"]["kernel"].shape == (128, 512)
    named = config_base.load_config("configs/clip.py:size=B/16,text_size=base")
    assert (named.model.image.patch_size, named.model.image.mlp_dim, named.model.text.depth) == (0, 0, 0)
    tower = config_base.base_config().model.image
    tower.update(width=96, depth=3, heads=3, mlp_dim=384)
    config_base.use_named_size(tower, "tiny")
    assert (tower.width, tower.depth, tower.heads, tower.mlp_dim, tower.patch_size) == (0, 0, 0, 0, 4)
    tower.update(width=96, mlp_dim=384)
    config_base.use_named_size(tower, "S/8")
    assert (tower.size, tower.width, tower.mlp_dim, tower.patch_size) == ("S/8", 0, 0, 0)


def test_clip_reg_sweeps_lambda_over_five_values():
    """configs/clip_reg.py's get_sweep: lambda = 0.01, 0.03, 0.1, 0.3, 1.0, each reaching config.clip_reg.reg_weight
    through the sweep's own expansion (the budget of its docstring's command), and the docstring gives the command."""
    from clus_jax import sweep

    spec = os.path.join(REPO, "configs", "clip_reg.py") + ":steps=400,batch=128"
    runs = sweep.expand(spec, "/sweep")
    assert [r.overrides for r in runs] == [{"clip_reg.reg_weight": w} for w in (0.01, 0.03, 0.1, 0.3, 1.0)]
    for run in runs:
        config = config_base.load_config(spec)
        config_base.set_dotted(config, "clip_reg.reg_weight", run.overrides["clip_reg.reg_weight"])
        config_check.validate(config, num_devices=8)
        assert (config.total_steps, config.batch_size) == (400, 128) and run.total_steps == 400
    doc = open(spec.partition(":")[0]).read().split('"""')[1]
    assert "python -m clus_jax.sweep --config configs/clip_reg.py:steps=400,batch=128 --workdir" in doc


TINY = {"model.image.size": "mu", "model.text.size": "mu", "model.image.image_size": 16,
        "model.text.context_length": 8, "evals.run": "none", "log_every": 1, "checkpoint_every": 0,
        "data.synthetic_size": 256}


@pytest.mark.slow
@pytest.mark.parametrize("name", ["siglip", "clip_reg"])
def test_short_run_trains_without_nan(name, tmp_path):
    config = config_base.load_config(os.path.join(REPO, "configs", f"{name}.py") + ":steps=30,batch=32,synthetic")
    config.update_from_flattened_dict(TINY)
    loop.train_and_evaluate(config, str(tmp_path))
    losses = [r["train/loss"] for r in read_metrics(str(tmp_path)) if "train/loss" in r]
    assert len(losses) == 30 and np.all(np.isfinite(losses))
    assert np.mean(losses[-5:]) < np.mean(losses[:5])  # it learns the synthetic shape/colour captions
