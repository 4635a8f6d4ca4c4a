"""The loop end to end on synthetic data: metrics files, exact resume after a preemption, NaN handling, and a
throwaway objective and evaluator plugged in through the public seams only (README "Adding an evaluator")."""
import json
import logging
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import host_limits  # registered by tests/conftest.py
import pytest

from clus_jax.common.errors import ConfigError
from clus_jax.evaluate import registry as evaluators
from clus_jax.evaluate.runner import Evaluation
from clus_jax.objectives import registry as objectives
from clus_jax.train.experiment import build
from clus_jax.train import loop
from clus_jax.train.metrics_writer import read_metrics

import train_helpers as helpers  # registered by tests/conftest.py

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def loop_config(**kw):
    c = helpers.tiny_config("clip", total_steps=6, log_every=1, checkpoint_every=3, eval_every=0, **kw)
    c.data.synthetic_size = 64
    return c


def train_losses(workdir):
    return {r["step"]: r["train/loss"] for r in read_metrics(workdir) if "train/loss" in r}


class PreemptAfter:
    """Stands in for the SIGTERM handler: reports a preemption request after ``n`` steps."""

    def __init__(self, n):
        self.n, self.calls = n, 0

    def requested(self, step):
        self.calls += 1
        return self.calls >= self.n


def checkpoint_steps(workdir):
    """Steps of the completed checkpoints (orbax renames a step's folder to its number when it is done)."""
    return sorted(int(name) for name in os.listdir(os.path.join(workdir, "checkpoints")) if name.isdigit())


@pytest.mark.slow
def test_preempted_run_resumes_exactly(tmp_path, monkeypatch, caplog):
    full = str(tmp_path / "full")
    loop.train_and_evaluate(loop_config(), full)
    expected = train_losses(full)
    assert sorted(expected) == [1, 2, 3, 4, 5, 6]

    resumed = str(tmp_path / "resumed")
    monkeypatch.setattr(loop, "_Preemption", lambda: PreemptAfter(4))
    loop.train_and_evaluate(loop_config(), resumed)  # stops after step 4 with a checkpoint
    assert max(train_losses(resumed)) == 4
    assert checkpoint_steps(resumed)[-1] == 4  # the periodic one (3) and the preemption save (4)
    logged_before = len(read_metrics(resumed))
    monkeypatch.setattr(loop, "_Preemption", lambda: PreemptAfter(10**9))
    caplog.set_level(logging.INFO, logger="clus_jax")
    loop.train_and_evaluate(loop_config(), resumed)
    # The restart began at the preemption checkpoint: it says so and logs only the steps after it
    # (a restart from step 0 would log 1..6 again, with the same losses, and pass the comparison below).
    assert any("resumed from step 4" in m for m in caplog.messages), caplog.messages
    restarted = [r["step"] for r in read_metrics(resumed)[logged_before:] if "train/loss" in r]
    assert restarted == [5, 6]
    got = train_losses(resumed)
    # Same data order and same arithmetic on CPU: the losses after the restart are bit-identical.
    for step in range(1, 7):
        assert got[step] == expected[step], (step, got[step], expected[step])


def test_nonfinite_step_is_skipped_and_counted():
    config = helpers.tiny_config("clip")
    exp = build(config)
    state, step = exp.init_state(), exp.step
    before = jax.device_get(state)
    # A NaN logit scale poisons the loss and every gradient.
    bad_params = jax.tree.map(lambda x: x, state["params"])
    bad_params["logit_scale"] = jnp.full_like(state["params"]["logit_scale"], jnp.nan)
    state = {**state, "params": bad_params}
    before["params"]["logit_scale"] = np.float32(np.nan)
    batch = exp.global_batch(helpers.random_batches(config, 1)[0])
    new_state, metrics = step(state, batch)
    assert int(metrics["nonfinite"]) == 1
    after = jax.device_get(new_state)
    for a, b in zip(jax.tree.leaves(after["params"]), jax.tree.leaves(before["params"])):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(jax.tree.leaves(after["opt_state"]), jax.tree.leaves(before["opt_state"])):
        np.testing.assert_array_equal(a, b)
    assert int(after["step"]) == 1


@pytest.mark.slow
def test_consecutive_nonfinite_steps_stop_the_run(tmp_path, monkeypatch):
    config = loop_config(max_consecutive_nonfinite=2)
    config.model.logit_scale_init = float("nan")
    with pytest.raises(loop.NonFiniteError, match="2 consecutive steps had a non-finite loss"):
        loop.train_and_evaluate(config, str(tmp_path / "nan"))
    # The run left a checkpoint of its last good state (here: the untouched initial parameters).
    assert os.listdir(tmp_path / "nan" / "checkpoints")


@pytest.mark.slow
def test_cli_writes_metrics_and_prints_a_summary(tmp_path):
    workdir = str(tmp_path / "cli")
    cmd = [sys.executable, "-m", "clus_jax.train", "--config", "configs/clip.py:steps=4,batch=16,synthetic",
           "--workdir", workdir, "--config.model.image.size=mu", "--config.model.text.size=mu",
           "--config.model.image.image_size=16", "--config.model.text.context_length=8", "--config.log_every=2",
           "--config.evals.run=none"]
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    proc = host_limits.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, base_s=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "step 4/4" in proc.stdout
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert np.isfinite(summary["final_train_loss"])
    records = read_metrics(workdir)
    assert {2, 4} <= {r["step"] for r in records if "train/loss" in r}
    assert os.path.isdir(os.path.join(workdir, "tensorboard"))
    assert os.path.isdir(os.path.join(workdir, "checkpoints", "4"))


def test_cli_rejects_a_bad_config_value_with_one_line(tmp_path):
    cmd = [sys.executable, "-m", "clus_jax.train", "--config", "configs/clip.py:synthetic", "--workdir", str(tmp_path),
           "--config.batch_size=12"]
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    proc = host_limits.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, base_s=120)
    assert proc.returncode == 2
    assert "error: config.batch_size=12 is not divisible by the data-parallel size 8" in proc.stderr
    assert "Traceback" not in proc.stderr


# -- a throwaway objective and evaluator, through the public seams only ------------------------------------


class Throwaway(objectives.Objective):
    """Owns a [3, D] head it adds to every evaluation, adds nothing to the loss, reports its number of rows."""

    name = "test_throwaway"

    def init_params(self, rng, config):
        return {"head": jax.random.normal(rng, (3, int(config.model.embed_dim)))}

    def loss(self, ctx):
        return jnp.zeros([]), {}, ctx.state

    def eval_heads(self, params, config):
        return {"throwaway_head": params["head"]}

    def eval_metrics(self, params, config):
        return {"rows": float(len(params["head"]))}


class Probe(evaluators.Evaluator):
    """Encodes ``images`` black images; reports the embedding width and the heads it was given."""

    name = "test_probe"
    defaults = {"images": 4}

    def validate(self, settings, config):
        if settings.images < 1:
            raise ConfigError(f"config.evals.{settings.entry}.images={settings.images!r} must be >= 1")

    def run(self, settings, ctx):
        size = int(ctx.config.model.image.image_size)
        embeddings = ctx.encode_images(np.zeros((settings.images, size, size, 3), np.uint8))
        return Evaluation({f"probe/{settings.entry}/width": float(embeddings.shape[1]),
                           f"probe/{settings.entry}/images": float(len(embeddings)),
                           f"probe/{settings.entry}/heads": float(len(ctx.heads))})


@pytest.fixture
def throwaway():
    objectives.register(Throwaway)
    evaluators.register(Probe)
    yield
    objectives._REGISTRY.pop(Throwaway.name, None)
    evaluators._REGISTRY.pop(Probe.name, None)


@pytest.mark.slow
def test_a_throwaway_objective_and_evaluator_reach_metrics_and_the_report(tmp_path, throwaway):
    from clus_jax import report

    config = loop_config()
    config.total_steps = 2
    config.objectives = {"clip": 1.0, "test_throwaway": 1.0}
    config.evals.mine = {"type": "test_probe", "images": 3}  # a setting other than its default
    config.evals.run = "mine"
    config.evals.batch_size = 16
    workdir = str(tmp_path / "run")
    loop.train_and_evaluate(config, workdir)
    (line,) = [r for r in read_metrics(workdir) if "probe/mine/width" in r]
    assert line["step"] == 2
    assert line["objectives/test_throwaway/rows"] == 3.0
    assert (line["probe/mine/width"], line["probe/mine/images"], line["probe/mine/heads"]) == (32.0, 3.0, 1.0)
    out = tmp_path / "report"
    report.main([workdir, "--out", str(out)])
    page = (out / "report.html").read_text()
    assert "objectives/test_throwaway/rows" in page and "probe/mine/width" in page


@pytest.mark.slow
def test_a_damaged_newest_checkpoint_is_moved_aside_and_the_run_resumes_from_the_one_before(tmp_path, monkeypatch,
                                                                                            caplog):
    workdir = str(tmp_path / "run")
    monkeypatch.setattr(loop, "_Preemption", lambda: PreemptAfter(4))
    loop.train_and_evaluate(loop_config(), workdir)
    assert checkpoint_steps(workdir) == [3, 4]  # the periodic one and the preemption save
    first = train_losses(workdir)
    # Cut the newest checkpoint's array files, as a crash during a copy would.
    arrays = [os.path.join(folder, name) for folder, _, names in os.walk(os.path.join(workdir, "checkpoints", "4", "state"))
              for name in names if os.path.basename(folder) == "d"]
    assert arrays
    for path in arrays:
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 3)
    logged_before = len(read_metrics(workdir))
    monkeypatch.setattr(loop, "_Preemption", lambda: PreemptAfter(10**9))
    caplog.set_level(logging.INFO, logger="clus_jax")
    loop.train_and_evaluate(loop_config(), workdir)
    # One line says which step, why, where it went and where the run resumed; the run began at step 3.
    (line,) = [m for m in caplog.messages if "checkpoint step 4" in m]
    assert "\n" not in line, line
    assert "damaged-4" in line and line.endswith("resuming from step 3"), line
    assert any("resumed from step 3" in m for m in caplog.messages), caplog.messages
    restarted = [r["step"] for r in read_metrics(workdir)[logged_before:] if "train/loss" in r]
    assert restarted == [4, 5, 6]
    assert train_losses(workdir)[4] == first[4]  # step 4 again, from step 3's state: the same loss, bit for bit
    assert os.path.isdir(os.path.join(workdir, "checkpoints", "damaged-4"))
    assert checkpoint_steps(workdir) == [3, 6]
