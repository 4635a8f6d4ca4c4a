"""Crashes and preemptions cost at most the steps since the last checkpoint, and resume is exact.

Each run is a real training process on synthetic data: SIGKILL after a step, SIGKILL while an
asynchronous checkpoint is being written, and SIGTERM (preemption). The restarted runs must log the
same per-step losses as an uninterrupted run, bit for bit (same data order, same CPU arithmetic).
"""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STEPS = 8
ARGS = ["--config", f"configs/clip.py:steps={STEPS},batch=16,synthetic", "--config.model.image.size=mu",
        "--config.model.text.size=mu", "--config.model.image.image_size=16", "--config.model.text.context_length=8",
        "--config.log_every=1", "--config.checkpoint_every=3", "--config.evals.sets=none",
        "--config.data.synthetic_size=96"]

pytestmark = pytest.mark.slow


def command(workdir):
    return [sys.executable, "-m", "clus_jax.train", *ARGS, "--workdir", workdir]


def env(fault=None):
    e = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "PYTHONUNBUFFERED": "1"}
    e.pop("CLUS_JAX_FAULT", None)
    if fault:
        e["CLUS_JAX_FAULT"] = fault
    return e


def run(workdir, fault=None):
    return subprocess.run(command(workdir), cwd=REPO, env=env(fault), capture_output=True, text=True, timeout=600)


def losses(workdir):
    """The last logged loss of every step (a restarted run logs the replayed steps again)."""
    out = {}
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for line in f:
            record = json.loads(line)
            if "train/loss" in record:
                out[record["step"]] = record["train/loss"]
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("reference"))
    proc = run(workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ref = losses(workdir)
    assert sorted(ref) == list(range(1, STEPS + 1))
    return ref


def test_sigkill_after_a_step_and_during_an_async_save(reference, tmp_path):
    workdir = str(tmp_path)
    first = run(workdir, fault="after_step:5")
    assert first.returncode == -signal.SIGKILL
    second = run(workdir, fault="during_save:6")  # resumes at 3, dies while step 6 is being written
    assert second.returncode == -signal.SIGKILL
    third = run(workdir)
    assert third.returncode == 0, third.stderr[-3000:]
    assert losses(workdir) == reference


def test_sigterm_saves_at_the_next_step_and_exits_cleanly(reference, tmp_path):
    workdir = str(tmp_path)
    proc = subprocess.Popen(command(workdir), cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while time.time() < deadline:
        line = proc.stdout.readline()
        if line.startswith("step 2/"):
            break
        assert line or proc.poll() is None, "training ended before it could be preempted"
    proc.send_signal(signal.SIGTERM)
    rest, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, rest[-3000:]
    saved = sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit())
    assert saved and saved[-1] < STEPS  # saved where it stopped, not at the end
    resumed = run(workdir)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert losses(workdir) == reference
