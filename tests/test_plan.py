"""Pre-flight plan: its state figures agree with XLA's own memory statistics, and the CLI fails clearly."""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import jax
import host_limits  # registered by tests/conftest.py
import pytest

from clus_jax import plan as plan_lib
from clus_jax.config.base import load_config

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = {"model.image.size": "mu", "model.text.size": "mu", "model.image.image_size": 16,
        "model.text.context_length": 8}


def _config(spec: str, overrides: dict):
    config = load_config(str(ROOT / spec))
    for key, value in overrides.items():
        node = config
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return config


@pytest.mark.parametrize(
    "spec,overrides,mesh",
    [
        ("configs/clip.py:batch=16,synthetic", TINY, {"data": 4, "fsdp": 2, "tensor": 1}),
        ("configs/clip.py:batch=32,synthetic", {}, {"data": 2, "fsdp": 2, "tensor": 2}),
    ],
    ids=["tiny", "small"],
)
@pytest.mark.slow  # compiles the step on 8 devices twice; the fast tier runs the command's config check
def test_plan_state_matches_compiled_arguments(spec, overrides, mesh):
    """State + batch bytes per device from shapes and shardings = XLA's argument size (within 10%)."""
    assert jax.device_count() == 8
    config = _config(spec, overrides)
    plan = plan_lib.make_plan(config, mesh)
    assert plan["mesh"] == mesh and plan["num_devices"] == 8
    assert plan["per_device_batch"] == config.batch_size / (mesh["data"] * mesh["fsdp"])
    ours = plan["state_bytes_per_device"] + plan["batch_bytes_per_device"]
    assert ours == pytest.approx(plan["compiled_argument_size_in_bytes"], rel=0.10)
    # the donated state comes back as aliased outputs, so the non-donated outputs are only the metrics
    assert plan["compiled_alias_size_in_bytes"] == pytest.approx(plan["state_bytes_per_device"], rel=0.10)
    assert plan["unaliased_output_bytes_per_device"] < 64 * 1024
    # FSDP over 2 splits the large parameters: per device is well under the global size, never above it
    assert plan["params_bytes_per_device"] < 0.75 * plan["params_bytes_global"]
    assert plan["opt_state_bytes_per_device"] == pytest.approx(2 * plan["params_bytes_per_device"], rel=0.05)
    assert plan["temp_bytes_per_device"] > 0
    assert plan["total_bytes_per_device"] > ours + plan["temp_bytes_per_device"] - 1
    assert plan_lib.check_fits(plan, 16) is None
    problem = plan_lib.check_fits(plan, 1e-4)
    assert problem.startswith("plan: ") and "does not fit" in problem and "\n" not in problem
    assert "activations + temporaries (XLA)" in plan_lib.format_table(plan, 16)


@pytest.mark.slow
def test_plan_cli_simulates_devices_and_fails_when_too_big():
    """--num-devices 4 on fake CPU devices; a tiny --device-memory-gb gives exit 3 and one clear line."""
    args = [sys.executable, "-m", "clus_jax.plan", "--config", "configs/clip.py:batch=16,synthetic",
            "--num-devices", "4", "--mesh", "data=2,fsdp=2", "--device-memory-gb", "0.001", "--workdir", "ignored",
            *[f"--config.{k}={v}" for k, v in TINY.items()]]
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    out = host_limits.run(args, cwd=ROOT, env=env, capture_output=True, text=True, base_s=300)
    assert out.returncode == plan_lib.EXIT_DOES_NOT_FIT, out.stderr[-2000:]
    plan = json.loads(out.stdout.strip().splitlines()[-1])
    assert plan["num_devices"] == 4 and plan["platform"] == "cpu" and plan["fits"] is False
    assert plan["mesh"] == {"data": 2, "fsdp": 2, "tensor": 1} and plan["per_device_batch"] == 4
    assert "memory plan on 4 cpu devices" in out.stdout
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("plan: ") and "does not fit in --device-memory-gb=0.001" in last


def test_plan_cli_config_error():
    args = [sys.executable, "-m", "clus_jax.plan", "--config", "configs/clip.py:batch=10,synthetic",
            "--num-devices", "4"]
    out = host_limits.run(args, cwd=ROOT, capture_output=True, text=True, base_s=300)
    assert out.returncode == plan_lib.EXIT_CONFIG_ERROR
    assert "config.batch_size=10 is not divisible" in out.stderr
