"""Several processes (jax.distributed on 127.0.0.1, gloo): a dead peer stops the others quickly with a
clear error, and restarting all of them resumes from the last checkpoint with the same losses."""
import json
import os
import socket
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(workdir, steps, logs):
    port = free_port()
    procs = []
    for i in range(2):
        env = {**os.environ, "CLUS_JAX_COORDINATOR": f"127.0.0.1:{port}", "CLUS_JAX_NUM_PROCESSES": "2",
               "CLUS_JAX_PROCESS_ID": str(i), "CLUS_JAX_HEARTBEAT_TIMEOUT": "10", "JAX_PLATFORMS": "cpu",
               "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "PYTHONUNBUFFERED": "1"}
        cmd = [sys.executable, "-m", "clus_jax.train", "--config", f"configs/clip.py:steps={steps},batch=16,synthetic",
               "--config.model.image.size=mu", "--config.model.text.size=mu", "--config.model.image.image_size=16",
               "--config.model.text.context_length=8", "--config.log_every=1", "--config.checkpoint_every=4",
               "--config.evals.sets=none", "--workdir", workdir]
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


def wait_for_step(workdir, step, procs, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if os.path.exists(os.path.join(workdir, "metrics.jsonl")) and any(s >= step for s, _ in logged_losses(workdir)):
            return
        assert all(p.poll() is None for p in procs), "a process ended early"
        time.sleep(0.5)
    raise TimeoutError(f"step {step} not reached")


def test_dead_peer_stops_the_survivor_and_restart_resumes(tmp_path):
    workdir, logs = str(tmp_path / "w"), str(tmp_path)
    procs = start(workdir, 16, logs)
    try:
        wait_for_step(workdir, 9, procs)
        procs[1].kill()
        t0 = time.time()
        rc = procs[0].wait(timeout=120)
        elapsed = time.time() - t0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert rc != 0 and elapsed < 60, (rc, elapsed)
    with open(os.path.join(logs, "p0.log")) as f:
        survivor = f.read()
    assert "another task died" in survivor or "stopped sending heartbeats" in survivor

    checkpoints = sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit())
    before = logged_losses(workdir)
    procs = start(workdir, 16, logs)
    assert [p.wait(timeout=600) for p in procs] == [0, 0]
    with open(os.path.join(logs, "p0.log")) as f:
        restarted = f.read()
    if checkpoints:
        assert f"resumed from step {checkpoints[-1]}" in restarted
    after = logged_losses(workdir)[len(before):]
    assert after[-1][0] == 16
    # Steps replayed after the restart give exactly the losses logged before the crash.
    first = dict(before)
    replayed = [(s, l) for s, l in after if s in first]
    assert replayed and all(first[s] == l for s, l in replayed)
