"""A workdir belongs to its run: ``train`` started in a finished run's workdir with another config fails with
one line before anything is written (the run's files stay byte-identical, it still loads and re-evaluates to the
same figures), a restart of
the same run with other settings resumes, and ``--overwrite`` moves the earlier run aside, whole."""
import os
import shutil
import sys

import host_limits  # registered by tests/conftest.py
import numpy as np
import pytest
from snapshots import snapshot  # registered by tests/conftest.py

import clus_jax
from clus_jax.common.errors import UsageError
from clus_jax.config import base as config_base
from clus_jax.config.run_config import load_run_config
from clus_jax.train import loop
from clus_jax.train import workdir as workdir_lib
from clus_jax.train.experiment import build
from clus_jax.train.reevaluate import reevaluate

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# The smallest run of the fault-tolerance tests, as command-line overrides and as the same config in process.
OVERRIDES = {"model.image.size": "mu", "model.text.size": "mu", "model.image.image_size": 16,
             "model.text.context_length": 8, "evals.run": "none", "data.synthetic_size": 32, "log_every": 1,
             "checkpoint_every": 0}


def config_of(spec: str, **more):
    config = config_base.load_config(spec)
    for key, value in {**OVERRIDES, **more}.items():
        node = config
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return config


@pytest.fixture(scope="module")
def finished_clip(tmp_path_factory):
    """A finished two-step CLIP run (checkpoint of step 2, config.json, metrics); tests use copies."""
    workdir = str(tmp_path_factory.mktemp("clip") / "run")
    loop.train_and_evaluate(config_of("configs/clip.py:steps=2,batch=16,synthetic"), workdir)
    return workdir


@pytest.fixture
def clip_run(finished_clip, tmp_path):
    workdir = str(tmp_path / "clip")
    shutil.copytree(finished_clip, workdir)
    return workdir


def assert_loads(workdir):
    model = clus_jax.load(workdir)
    assert model.step == 2
    emb = model.encode_text(["a red circle"])
    assert emb.shape == (1, 128) and np.all(np.isfinite(emb))


def figures(workdir) -> tuple[int, dict[str, float]]:
    """The run's checkpoint re-evaluated by the default evaluator (it trained with none), metrics.jsonl left
    alone: (step, every figure but the time it took)."""
    step, metrics = reevaluate(workdir, append=False, evals="embedded")
    del metrics["eval/seconds"]
    return step, metrics


def test_another_config_leaves_a_finished_run_untouched(clip_run):
    evaluated = figures(clip_run)  # before the snapshot: it writes the evaluation's arrays into the workdir
    before = snapshot(clip_run)
    args = [f"--config.{k}={v}" for k, v in OVERRIDES.items()]
    cmd = [sys.executable, "-m", "clus_jax.train", "--config", "configs/siglip.py:steps=2,batch=16,synthetic", *args,
           "--workdir", clip_run]
    proc = host_limits.run(cmd, cwd=REPO, capture_output=True, text=True, base_s=120,
                           env={**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"})
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: --workdir {clip_run} holds another run's checkpoints"), \
        proc.stderr[-3000:]
    for named in ("objectives ([\"clip\"] -> [\"siglip\"])", "model.logit_bias_init (null -> -10.0)",
                  "params.logit_bias (not saved)", "--overwrite"):
        assert named in lines[0], lines[0]
    assert snapshot(clip_run) == before  # nothing written, nothing touched
    assert load_run_config(clip_run).objectives.to_dict() == {"clip": 1.0}
    assert_loads(clip_run)
    assert figures(clip_run) == evaluated


def test_the_same_run_with_other_settings_resumes(clip_run):
    """What may change between restarts: steps, learning rate, objective weights, remat."""
    spec = "configs/clip.py:steps=4,batch=16,synthetic"
    for more in ({}, {"optim.lr": 1e-4, "objectives": {"clip": 0.5}, "model.remat": True}):
        config = config_of(spec, **more)
        workdir_lib.check_same_run(clip_run, config, build(config).abstract_state)


def test_a_model_change_is_named_from_the_config_and_from_the_checkpoint(clip_run):
    config = config_of("configs/clip.py:steps=4,batch=16,synthetic", **{"model.embed_dim": 96})
    abstract = build(config).abstract_state
    with pytest.raises(UsageError, match=r"config\.json differs in model\.embed_dim \(128 -> 96\); the checkpoint "
                                         r"of step 2 differs in params\.image_proj\.kernel \[64, 128\] -> \[64, 96\]"):
        workdir_lib.check_same_run(clip_run, config, abstract)
    # Without config.json (a run from before it existed) the saved arrays alone say it.
    os.remove(os.path.join(clip_run, "config.json"))
    with pytest.raises(UsageError, match=r"holds another run's checkpoints \(the checkpoint of step 2 differs in "
                                         r"params\.image_proj\.kernel"):
        workdir_lib.check_same_run(clip_run, config, abstract)


@pytest.mark.slow
def test_overwrite_moves_the_earlier_run_aside_whole(clip_run):
    before = snapshot(clip_run)
    siglip = config_of("configs/siglip.py:steps=2,batch=16,synthetic")
    loop.train_and_evaluate(siglip, clip_run, overwrite=True)
    (replaced,) = [n for n in os.listdir(clip_run) if n.startswith("replaced-")]
    assert snapshot(os.path.join(clip_run, replaced)) == before
    assert_loads(os.path.join(clip_run, replaced))  # the CLIP run, where it was moved
    assert load_run_config(clip_run).objectives.to_dict() == {"siglip": 1.0}
    assert "logit_bias" in clus_jax.load(clip_run).params
