"""Several processes (jax.distributed on 127.0.0.1, gloo): a dead peer stops the others quickly with a
clear error, and restarting all of them resumes from the last completed checkpoint (each says so, and the
restart logs only the steps after it) with the same losses."""
import json
import os
import subprocess
import sys
import time

import host_limits  # registered by tests/conftest.py
import local_processes  # registered by tests/conftest.py
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]


def start(workdir, steps, logs):
    port = local_processes.free_port()
    procs = []
    for i in range(2):
        env = local_processes.process_env(port, 2, i, 2, CLUS_JAX_HEARTBEAT_TIMEOUT="10")
        cmd = [sys.executable, "-m", "clus_jax.train", "--config", f"configs/clip.py:steps={steps},batch=16,synthetic",
               "--config.model.image.size=mu", "--config.model.text.size=mu", "--config.model.image.image_size=16",
               "--config.model.text.context_length=8", "--config.log_every=1", "--config.checkpoint_every=4",
               "--config.evals.run=none", "--workdir", workdir]
        log = open(os.path.join(logs, f"p{i}.log"), "a")
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT))
    return procs


def logged_losses(workdir):
    seen = []
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for line in f:
            r = json.loads(line)
            if "train/loss" in r:
                seen.append((r["step"], r["train/loss"]))
    return seen


def completed_checkpoints(workdir):
    """Steps whose save finished (orbax renames '<step>.orbax-checkpoint-tmp...' to '<step>' at the end)."""
    folder = os.path.join(workdir, "checkpoints")
    return sorted(int(s) for s in os.listdir(folder) if s.isdigit()) if os.path.isdir(folder) else []


def logs_tail(logs):
    """The last lines each process wrote, for a failure message."""
    tails = []
    for i in range(2):
        with open(os.path.join(logs, f"p{i}.log")) as f:
            tails.append(f"--- p{i}.log (tail) ---\n" + "\n".join(f.read().splitlines()[-30:]))
    return "\n".join(tails)


def wait_for_checkpoint(workdir, procs, total, logs, base_s=120):
    """Waits for a periodic checkpoint (not the one at the end) to be complete while training still runs."""
    deadline = host_limits.deadline(base_s)
    while not completed_checkpoints(workdir):
        assert all(p.poll() is None for p in procs), "a process ended before any checkpoint was completed"
        assert time.time() < deadline, f"no checkpoint was completed in {host_limits.limit(base_s):.0f} s\n" + logs_tail(logs)
        time.sleep(0.2)
    assert completed_checkpoints(workdir)[0] < total, f"no periodic checkpoint, only {completed_checkpoints(workdir)}"


def wait_for_step(workdir, step, procs, logs, base_s=300):
    deadline = host_limits.deadline(base_s)
    while time.time() < deadline:
        if os.path.exists(os.path.join(workdir, "metrics.jsonl")) and any(s >= step for s, _ in logged_losses(workdir)):
            return
        assert all(p.poll() is None for p in procs), "a process ended early\n" + logs_tail(logs)
        time.sleep(0.5)
    pytest.fail(f"step {step} not reached in {host_limits.limit(base_s):.0f} s\n" + logs_tail(logs), pytrace=False)


def test_dead_peer_stops_the_survivor_and_restart_resumes(tmp_path):
    workdir, logs = str(tmp_path / "w"), str(tmp_path)
    procs = start(workdir, 16, logs)
    try:
        wait_for_step(workdir, 9, procs, logs)
        # Saves at 4 and 8 were started (the one at 8 waits for 4 to finish): the kill must find one complete.
        wait_for_checkpoint(workdir, procs, 16, logs)
        procs[1].kill()
        t0 = time.time()
        rc = host_limits.wait(procs[0], 120)
        elapsed = time.time() - t0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    # The heartbeat timeout is 10 s; the rest is the survivor's own shutdown, slower on a slower host.
    assert rc != 0 and elapsed < host_limits.limit(60), (rc, elapsed, host_limits.factor())
    with open(os.path.join(logs, "p0.log")) as f:
        survivor = f.read()
    assert "another task died" in survivor or "stopped sending heartbeats" in survivor

    checkpoints = completed_checkpoints(workdir)
    assert checkpoints and checkpoints[-1] >= 4, checkpoints
    latest = checkpoints[-1]
    before = logged_losses(workdir)
    offsets = [os.path.getsize(os.path.join(logs, f"p{i}.log")) for i in range(2)]
    procs = start(workdir, 16, logs)
    assert [host_limits.wait(p, 600) for p in procs] == [0, 0], logs_tail(logs)
    for i, offset in enumerate(offsets):
        with open(os.path.join(logs, f"p{i}.log")) as f:
            f.seek(offset)
            restarted = f.read()
        assert f"resumed from step {latest}" in restarted, (i, restarted[-3000:])
    after = logged_losses(workdir)[len(before):]
    # The restart began at the checkpoint: it logged the later steps only, each once.
    assert [s for s, _ in after] == list(range(latest + 1, 17)), after
    # Steps replayed after the restart give exactly the losses logged before the crash.
    first = dict(before)
    replayed = [(s, l) for s, l in after if s in first]
    assert replayed and all(first[s] == l for s, l in replayed)
