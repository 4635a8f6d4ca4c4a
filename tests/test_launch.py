"""Launchers: dry runs print complete command sequences, local.sh supervises its processes, and two local
processes train exactly like one process with the same devices."""
from __future__ import annotations

import json
import os
import pathlib
import shlex
import subprocess
import sys
import textwrap
import time

import host_limits  # registered by tests/conftest.py
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = [
    "--config.model.image.size=mu", "--config.model.text.size=mu", "--config.model.image.image_size=16",
    "--config.model.text.context_length=8", "--config.log_every=1", "--config.evals.run=none",
]
TINY_CONFIG = "configs/clip.py:steps=4,batch=16,synthetic"


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "CLUS_JAX_", "TPU_", "TEARDOWN", "SKIP_", "EXTRA_ARGS", "LOCAL_"))}
    env.update(extra)
    return env


def _run(cmd: list[str], base_s: float = 120, **env: str) -> subprocess.CompletedProcess:
    """The command within ``base_s`` seconds on the reference host, scaled by the host factor."""
    return host_limits.run(cmd, base_s, cwd=ROOT, env=_env(**env))


def _commands(stdout: str) -> list[list[str]]:
    """The '+ ' lines of a dry run, parsed back into argument lists (so the quoting is checked too)."""
    return [shlex.split(line[2:]) for line in stdout.splitlines() if line.startswith("+ ")]


def _flag(argv: list[str], name: str) -> str:
    return next(a.split("=", 1)[1] for a in argv if a.startswith(f"{name}="))


# ----------------------------------------------------------------------------------------------- tpu_pod.sh
TPU_ENV = dict(TPU_NAME="clus-test", ZONE="us-east5-a", PROJECT="proj", ACCELERATOR_TYPE="v4-16",
               CONFIG="configs/clip.py:steps=10", WORKDIR="gs://bucket/run 1",
               EXTRA_ARGS="--config.optim.lr=3e-4 --config.mesh.fsdp=4")


def test_tpu_pod_dry_run_prints_every_step():
    out = _run(["launch/tpu_pod.sh", "--dry-run", "--", "--config.seed=7"], SKIP_PLAN="1", **TPU_ENV)
    assert out.returncode == 0, out.stderr
    cmds = _commands(out.stdout)
    gcloud = [c for c in cmds if c[0] == "gcloud"]
    verbs = [c[4] for c in gcloud]
    assert verbs == ["describe", "create", "scp", "ssh", "ssh", "ssh"], verbs  # no delete unless asked
    for c in gcloud:
        assert c[:4] == ["gcloud", "compute", "tpus", "tpu-vm"]
        assert c[5] == "clus-test" or c[6] == "clus-test:clus_jax_src.tar.gz"  # scp: source, then target
        assert "--zone=us-east5-a" in c and "--project=proj" in c
    create = gcloud[1]
    assert "--accelerator-type=v4-16" in create and "--version=tpu-ubuntu2204-base" in create
    for c in gcloud[2:]:
        assert "--worker=all" in c
    setup = _flag(gcloud[4], "--command")
    assert "python3 -m venv .venv" in setup and "pip install -q -e . 'jax[tpu]" in setup

    train = shlex.split(_flag(gcloud[5], "--command"))
    assert "CLUS_JAX_DISTRIBUTED=auto" in train
    start = train.index("clus_jax.train") + 1
    assert train[start - 3:start] == ["python", "-m", "clus_jax.train"]
    assert train[start:] == ["--config", "configs/clip.py:steps=10", "--workdir", "gs://bucket/run 1",
                             "--config.optim.lr=3e-4", "--config.mesh.fsdp=4", "--config.seed=7"]
    assert "appended to runs/logs/tpu_clus-test_" in out.stdout


def test_tpu_pod_teardown_only_when_asked_and_git_sync():
    out = _run(["launch/tpu_pod.sh", "--dry-run"], SKIP_PLAN="1", TEARDOWN="1", SYNC="git",
               GIT_REPO="https://example.com/clus_jax.git", GIT_REF="v1.2", SPOT="1", **TPU_ENV)
    assert out.returncode == 0, out.stderr
    gcloud = [c for c in _commands(out.stdout) if c[0] == "gcloud"]
    assert gcloud[-1][4] == "delete" and "--quiet" in gcloud[-1]
    assert "--spot" in gcloud[1]
    assert not any(c[4] == "scp" for c in gcloud)
    clone = _flag(gcloud[2], "--command")
    assert "git clone https://example.com/clus_jax.git clus_jax" in clone and "git checkout --force v1.2" in clone

    out = _run(["launch/tpu_pod.sh", "--dry-run", "--skip-setup", "--teardown"], SKIP_PLAN="1", **TPU_ENV)
    verbs = [c[4] for c in _commands(out.stdout) if c[0] == "gcloud"]
    assert verbs == ["describe", "create", "ssh", "delete"]


def test_tpu_pod_usage_errors():
    out = _run(["launch/tpu_pod.sh", "--dry-run"], TPU_NAME="x")
    assert out.returncode == 2 and "set ZONE CONFIG WORKDIR" in out.stderr and "Usage:" in out.stderr
    out = _run(["launch/tpu_pod.sh", "--dry-run"], SKIP_PLAN="1", **{**TPU_ENV, "ACCELERATOR_TYPE": "z9-8"})
    assert out.returncode == 2 and "unknown ACCELERATOR_TYPE" in out.stderr


@pytest.mark.slow
def test_tpu_pod_runs_plan_first_and_refuses_when_it_does_not_fit():
    env = {**TPU_ENV, "CONFIG": TINY_CONFIG, "EXTRA_ARGS": " ".join(TINY), "PYTHON": sys.executable,
           "ACCELERATOR_TYPE": "v4-8"}
    out = _run(["launch/tpu_pod.sh", "--dry-run"], base_s=300, DEVICE_MEMORY_GB="0.001", **env)
    assert out.returncode == 1
    assert "not launching" in out.stderr and "does not fit" in out.stderr
    plan = _commands(out.stdout)[0]
    assert plan[1:4] == ["-m", "clus_jax.plan", "--num-devices"] and plan[4] == "4"  # v4-8: 4 chips
    assert not any(c[0] == "gcloud" for c in _commands(out.stdout))

    out = _run(["launch/tpu_pod.sh", "--dry-run"], base_s=300, **env)
    assert out.returncode == 0, out.stderr
    plan = json.loads(next(line for line in out.stdout.splitlines() if line.startswith("{")))
    assert plan["num_devices"] == 4 and plan["fits"] and plan["device_memory_bytes"] == 32 * 2**30
    assert any(c[0] == "gcloud" and c[4] == "create" for c in _commands(out.stdout))


# ------------------------------------------------------------------------------------------ gpu launchers
def _task_env(stdout: str) -> dict[str, str]:
    env = {}
    for line in stdout.splitlines():
        if line.startswith("export "):
            key, _, value = shlex.split(line[len("export "):])[0].partition("=")
            env[key] = value
    return env


def test_gpu_slurm_dry_run_one_process_per_node():
    out = _run(["bash", "launch/gpu_slurm.sbatch", "--dry-run"], SKIP_PLAN="1", CONFIG="configs/clip.py:size=B/16",
               WORKDIR="/shared/run", EXTRA_ARGS="--config.mesh.fsdp=8", SLURM_JOB_NODELIST="gpu-[017-020,031],cpu-1",
               SLURM_JOB_NUM_NODES="5", SLURM_NTASKS="5")
    assert out.returncode == 0, out.stderr
    srun, train = _commands(out.stdout)
    assert srun[:4] == ["srun", "--kill-on-bad-exit=1", "--label", "--ntasks-per-node=1"]
    assert srun[-2:] == ["bash", "launch/gpu_multinode.sh"]
    env = _task_env(out.stdout)
    assert env["COORDINATOR"] == "gpu-017:10000" and env["NUM_PROCESSES"] == "5"
    assert env["CLUS_JAX_COORDINATOR"] == "gpu-017:10000"
    assert env["CLUS_JAX_NUM_PROCESSES"] == "5" and env["CLUS_JAX_PROCESS_ID"] == "0"
    assert env["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.9"
    flags = env["XLA_FLAGS"].split()
    assert "--xla_gpu_enable_latency_hiding_scheduler=true" in flags
    assert any(f.startswith("--xla_gpu_all_reduce_combine_threshold_bytes=") for f in flags)
    assert "CUDA_VISIBLE_DEVICES" not in env and "GPU_PER_PROCESS" not in env
    assert train == ["python3", "-m", "clus_jax.train", "--config", "configs/clip.py:size=B/16",
                     "--workdir", "/shared/run", "--config.mesh.fsdp=8"]


def test_gpu_slurm_dry_run_per_gpu_and_auto_init():
    out = _run(["bash", "launch/gpu_slurm.sbatch", "--dry-run"], SKIP_PLAN="1", CONFIG="c", WORKDIR="w",
               SLURM_JOB_NODELIST="node1,node2", SLURM_JOB_NUM_NODES="2", SLURM_NTASKS="16",
               COORDINATOR_PORT="2222")
    env = _task_env(out.stdout)
    assert _commands(out.stdout)[0][3] == "--ntasks-per-node=8"
    assert env["COORDINATOR"] == "node1:2222" and env["GPU_PER_PROCESS"] == "1"
    assert env["CUDA_VISIBLE_DEVICES"] == "0" and env["CLUS_JAX_NUM_PROCESSES"] == "16"

    out = _run(["bash", "launch/gpu_slurm.sbatch", "--dry-run"], SKIP_PLAN="1", CONFIG="c", WORKDIR="w", INIT="auto")
    env = _task_env(out.stdout)
    assert env["CLUS_JAX_DISTRIBUTED"] == "auto" and "CLUS_JAX_COORDINATOR" not in env

    out = _run(["bash", "launch/gpu_slurm.sbatch"], CONFIG="c", WORKDIR="w")
    assert out.returncode == 2 and "not inside a SLURM job" in out.stderr


def test_gpu_multinode_pins_gpu_and_needs_coordinates():
    out = _run(["launch/gpu_multinode.sh", "--dry-run", "--", "--config.seed=3"], CONFIG="c", WORKDIR="w",
               COORDINATOR="h:1", NUM_PROCESSES="2", PROCESS_ID="1", GPU_PER_PROCESS="1",
               CUDA_VISIBLE_DEVICES="4,5,6,7", SLURM_LOCALID="2", XLA_FLAGS="--xla_gpu_enable_triton_gemm=true")
    env = _task_env(out.stdout)
    assert env["CUDA_VISIBLE_DEVICES"] == "6" and env["CLUS_JAX_PROCESS_ID"] == "1"
    assert env["XLA_FLAGS"].endswith("--xla_gpu_enable_triton_gemm=true")  # the caller's flags come last
    assert _commands(out.stdout)[0][-1] == "--config.seed=3"
    out = _run(["launch/gpu_multinode.sh", "--dry-run"], CONFIG="c", WORKDIR="w")
    assert out.returncode == 2 and "COORDINATOR" in out.stderr


def test_gpu_xla_flags_are_known_to_xla():
    """XLA aborts on unknown XLA_FLAGS; the GPU flag names are shared with the CPU build, so check here."""
    out = _run(["launch/gpu_multinode.sh", "--dry-run"], CONFIG="c", WORKDIR="w", INIT="auto")
    flags = _task_env(out.stdout)["XLA_FLAGS"]
    check = _run([sys.executable, "-c", "import jax; jax.devices()"], XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
    assert check.returncode == 0, check.stderr[-500:]
    bogus = _run([sys.executable, "-c", "import jax; jax.devices()"], XLA_FLAGS="--xla_gpu_no_such_flag=1",
                 JAX_PLATFORMS="cpu")
    assert bogus.returncode != 0  # the check above would catch a renamed flag


# ---------------------------------------------------------------------------------------------- local.sh
def test_local_dry_run_prints_each_process():
    out = _run(["launch/local.sh", "--dry-run", "2", "--config", TINY_CONFIG, "--workdir", "/tmp/w x"],
               XLA_FLAGS="--xla_force_host_platform_device_count=8 --xla_cpu_use_thunk_runtime=true")
    assert out.returncode == 0, out.stderr
    lines = [line for line in out.stdout.splitlines() if line.startswith("+ ")]
    assert len(lines) == 2
    for i, line in enumerate(lines):
        cmd, _, log = line.partition(" 2>&1 | tee ")
        argv = shlex.split(cmd[2:])
        assert shlex.split(log) == [f"/tmp/w x/logs/process_{i}.log"]
        env = dict(a.split("=", 1) for a in argv[1:7])
        assert env["JAX_PLATFORMS"] == "cpu" and env["CLUS_JAX_CPU_COLLECTIVES"] == "gloo"
        assert env["CLUS_JAX_COORDINATOR"] == "127.0.0.1:PORT"
        assert env["CLUS_JAX_NUM_PROCESSES"] == "2" and env["CLUS_JAX_PROCESS_ID"] == str(i)
        # the inherited device count is replaced, other flags kept
        assert env["XLA_FLAGS"] == "--xla_cpu_use_thunk_runtime=true --xla_force_host_platform_device_count=4"
        assert argv[7:] == ["python3", "-m", "clus_jax.train", "--config", TINY_CONFIG, "--workdir", "/tmp/w x"]

    out = _run(["launch/local.sh", "--dry-run", "3", "--workdir=/tmp/w"], LOCAL_DEVICES="2", PORT="1234")
    assert out.stdout.count("--xla_force_host_platform_device_count=2") == 3
    assert "127.0.0.1:1234" in out.stdout
    out = _run(["launch/local.sh", "--dry-run", "2", "--config", TINY_CONFIG])
    assert out.returncode == 2 and "--workdir" in out.stderr


def _fake_python(tmp_path: pathlib.Path, body: str) -> str:
    """An executable standing in for python: runs ``body`` with CLUS_JAX_PROCESS_ID set."""
    path = tmp_path / "fake_python"
    path.write_text("#!/usr/bin/env bash\n" + textwrap.dedent(body))
    path.chmod(0o755)
    return str(path)


def test_local_stops_the_others_when_one_process_fails(tmp_path):
    # Process 1 fails only once the others have printed their line, so a loaded machine cannot make the
    # launcher stop them before they ever wrote to their logs.
    fake = _fake_python(tmp_path, f"""
        echo "process $CLUS_JAX_PROCESS_ID of $CLUS_JAX_NUM_PROCESSES"
        touch "{tmp_path}/started_$CLUS_JAX_PROCESS_ID"
        if [ "$CLUS_JAX_PROCESS_ID" = 1 ]; then
            for _ in $(seq 200); do [ -e "{tmp_path}/started_0" ] && [ -e "{tmp_path}/started_2" ] && break; sleep 0.1; done
            exit 3
        fi
        sleep 60
    """)
    start = time.time()
    out = _run(["launch/local.sh", "3", "--workdir", str(tmp_path / "w")], PYTHON=fake, PORT="1", KILL_GRACE="2")
    assert out.returncode == 3, (out.stdout, out.stderr)
    assert time.time() - start < 30
    assert "process 1 exited with status 3" in out.stderr
    assert (tmp_path / "w/logs/process_0.log").read_text() == "process 0 of 3\n"
    assert "[2] process 2 of 3" in out.stdout


def test_local_timeout(tmp_path):
    fake = _fake_python(tmp_path, "sleep 60\n")
    out = _run(["launch/local.sh", "2", "--workdir", str(tmp_path)], PYTHON=fake, PORT="1", TIMEOUT="1",
               KILL_GRACE="1")
    assert out.returncode == 124 and "timed out" in out.stderr


def _losses(workdir: pathlib.Path) -> dict[int, float]:
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train/loss"] for r in records if "train/loss" in r}


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_local_processes_match_one_process(tmp_path):
    """2 processes x 4 devices and 1 process x 8 devices: same global batches, same mesh, same losses."""
    args = ["--config", TINY_CONFIG, *TINY]
    one = _run([sys.executable, "-m", "clus_jax.train", *args, "--workdir", str(tmp_path / "one")], base_s=600,
               JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8")
    assert one.returncode == 0, one.stderr[-3000:]
    two = _run(["launch/local.sh", "2", *args, "--workdir", str(tmp_path / "two")], base_s=600,
               PYTHON=sys.executable, TIMEOUT=str(int(host_limits.limit(500))))
    assert two.returncode == 0, (two.stdout[-3000:], two.stderr[-3000:])
    expected, got = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert sorted(got) == [1, 2, 3, 4] and sorted(expected) == sorted(got)
    for step in expected:
        assert got[step] == pytest.approx(expected[step], rel=1e-5, abs=1e-6), step
    assert (tmp_path / "two/logs/process_1.log").exists()
