"""Crashes and preemptions cost at most the steps since the last checkpoint, and resume is exact.

Each run is a real training process on synthetic data: SIGKILL after a step, SIGKILL while an
asynchronous checkpoint is being written, and SIGTERM (preemption). Every restart must begin at the newest
completed checkpoint (it says so, and its own log lines start right after that step), and together the
runs must log the same per-step losses as an uninterrupted run, bit for bit (same data order, same CPU
arithmetic). The losses alone would not show a restart from step 0: training is deterministic.
"""
import json
import os
import signal
import subprocess
import sys

import host_limits  # registered by tests/conftest.py
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STEPS = 8
EVERY = 2  # checkpoints at 2, 4, 6 (and 8 at the end)
ARGS = ["--config", f"configs/clip.py:steps={STEPS},batch=16,synthetic", "--config.model.image.size=mu",
        "--config.model.text.size=mu", "--config.model.image.image_size=16", "--config.model.text.context_length=8",
        "--config.log_every=1", f"--config.checkpoint_every={EVERY}", "--config.evals.run=none",
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


def records(workdir):
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def loss_steps(recs):
    return [r["step"] for r in recs if "train/loss" in r]


def losses(workdir):
    """The last logged loss of every step (a restarted run logs the replayed steps again)."""
    return {r["step"]: r["train/loss"] for r in records(workdir) if "train/loss" in r}


def checkpoints(workdir):
    """(completed steps, unfinished steps): orbax writes into '<step>.orbax-checkpoint-tmp...' and renames
    the folder to '<step>' only once the save is complete."""
    folder = os.path.join(workdir, "checkpoints")
    names = os.listdir(folder) if os.path.isdir(folder) else []
    done = sorted(int(n) for n in names if n.isdigit())
    unfinished = sorted(int(n.split(".")[0]) for n in names if not n.isdigit() and n.split(".")[0].isdigit() and "tmp" in n)
    return done, unfinished


def printed_steps(stdout):
    return [int(line.split()[1].split("/")[0]) for line in stdout.splitlines() if line.startswith("step ")]


class Run:
    """One training process and what it alone wrote: its metrics lines, stdout and stderr."""

    def __init__(self, workdir, fault=None):
        before = len(records(workdir))
        proc = host_limits.run(command(workdir), 600, cwd=REPO, env=env(fault))
        self.returncode, self.stdout, self.stderr = proc.returncode, proc.stdout, proc.stderr
        self.steps = loss_steps(records(workdir)[before:])

    def assert_resumed_from(self, step):
        assert f"resumed from step {step}" in self.stderr, self.stderr[-3000:]
        assert self.steps and self.steps[0] == step + 1, (step, self.steps)
        assert printed_steps(self.stdout)[0] == step + 1, self.stdout[-2000:]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("reference"))
    run = Run(workdir)
    assert run.returncode == 0, run.stderr[-3000:]
    ref = losses(workdir)
    assert sorted(ref) == list(range(1, STEPS + 1))
    assert "resumed from step" not in run.stderr
    return ref


def test_sigkill_after_a_step_and_during_an_async_save(reference, tmp_path):
    workdir = str(tmp_path)
    first = Run(workdir, fault="after_step:5")
    assert first.returncode == -signal.SIGKILL
    assert first.steps == [1, 2, 3, 4]  # step 5 died before its loss was read
    done, _ = checkpoints(workdir)
    # Step 2 is complete: the step-4 save waited for it. Step 4 may or may not have finished before the kill.
    assert done and done[0] == 2 and set(done) <= {2, 4}, done
    newest = done[-1]

    second = Run(workdir, fault="during_save:6")
    assert second.returncode == -signal.SIGKILL
    second.assert_resumed_from(newest)
    assert second.steps == list(range(newest + 1, 6))
    done, unfinished = checkpoints(workdir)
    # The kill interrupted the step-6 save: its folder was started but never completed.
    assert 6 in unfinished and 6 not in done, (done, unfinished)
    assert done[-1] == 4, done

    third = Run(workdir)
    assert third.returncode == 0, third.stderr[-3000:]
    third.assert_resumed_from(4)
    assert third.steps == [5, 6, 7, 8]
    assert checkpoints(workdir)[0][-1] == STEPS
    assert losses(workdir) == reference


def test_sigterm_saves_at_the_next_step_and_exits_cleanly(reference, tmp_path):
    workdir = str(tmp_path)
    proc = subprocess.Popen(command(workdir), cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    reader = host_limits.LineReader(proc)
    reader.until("step 2/", 300)
    proc.send_signal(signal.SIGTERM)
    output = reader.rest(300)
    assert proc.returncode == 0, output[-3000:]
    done, _ = checkpoints(workdir)
    assert done and done[-1] < STEPS, done  # saved where it stopped, not at the end
    stopped = done[-1]
    assert f"preempted: saved step {stopped}" in output, output[-3000:]
    assert loss_steps(records(workdir)) == list(range(1, stopped + 1))

    resumed = Run(workdir)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    resumed.assert_resumed_from(stopped)
    assert resumed.steps == list(range(stopped + 1, STEPS + 1))
    assert losses(workdir) == reference
