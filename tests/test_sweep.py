"""Sweeps: expansion into named runs, launch commands, the results table, and a local end-to-end sweep."""
from __future__ import annotations

import csv
import json
import pathlib
import shlex
import sys

import host_limits  # registered by tests/conftest.py
import pytest

from clus_jax import sweep

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = [
    "--config.model.image.size=mu", "--config.model.text.size=mu", "--config.model.image.image_size=16",
    "--config.model.text.context_length=8", "--config.checkpoint_every=0",
]


def _write_config(tmp_path: pathlib.Path, sweep_body: str) -> str:
    path = tmp_path / "swept.py"
    path.write_text(
        "from clus_jax.config import base as common\n\n"
        "def get_config(arg=None):\n"
        "    a = common.parse_arg(arg, steps=0, batch=0, synthetic=False, size='', text_size='', image_size=0)\n"
        "    config = common.base_config()\n"
        "    common.apply_args(config, a)\n"
        "    return config\n\n"
        f"def get_sweep():\n    return {sweep_body}\n"
    )
    return str(path)


def test_run_names_are_short_distinct_and_path_safe():
    assert sweep.run_name(0, {"optim.lr": 3e-4}) == "0_lr0.0003"
    assert sweep.run_name(2, {}) == "2_base"
    name = sweep.run_name(1, {"model.image.size": "B/16", "model.text.size": "base", "optim.lr": 1e-3})
    assert name == "1_model.image.sizeB-16-model.text.sizebase-lr0.001"
    assert sweep.format_value(3e-4) == "0.0003" and sweep.format_value(True) == "True"


def test_clip_config_defines_an_lr_sweep():
    points = sweep.sweep_points(str(ROOT / "configs/clip.py"))
    assert len(points) >= 2 and all(set(p) == {"optim.lr"} for p in points)
    assert len({p["optim.lr"] for p in points}) == len(points)


def test_expand_checks_keys_and_gives_distinct_workdirs(tmp_path):
    spec = _write_config(tmp_path, '[{"optim.lr": 1e-3}, {"optim.lr": 3e-4, "total_steps": 7}]') + ":steps=5"
    runs = sweep.expand(spec, str(tmp_path / "sw"), ["--config.model.image.size=mu"])
    assert [r.name for r in runs] == ["0_lr0.001", "1_lr0.0003-total_steps7"]
    assert [r.workdir for r in runs] == [str(tmp_path / "sw" / r.name) for r in runs]
    assert [r.total_steps for r in runs] == [5, 7]
    assert runs[1].override_args() == ["--config.optim.lr=0.0003", "--config.total_steps=7"]
    with pytest.raises(KeyError, match="optim.nope"):
        sweep.expand(_write_config(tmp_path, '[{"optim.nope": 1}]'), str(tmp_path))
    with pytest.raises(KeyError, match="model.nope"):
        sweep.expand(spec, str(tmp_path), ["--config.model.nope=1"])
    with pytest.raises(ValueError, match="same overrides twice"):
        sweep.expand(_write_config(tmp_path, '[{"seed": 1}, {"seed": 1}]'), str(tmp_path))


def test_launcher_commands(tmp_path):
    spec = _write_config(tmp_path, '[{"optim.lr": 1e-3}]')
    (run,) = sweep.expand(spec, "gs://bucket/sw")
    tpu = shlex.split(sweep.launcher_command("tpu_pod", spec, run, ["--config.seed=2"]))
    assert tpu[-1] == "launch/tpu_pod.sh"
    env = dict(a.split("=", 1) for a in tpu[:-1])
    assert env == {"CONFIG": spec, "WORKDIR": "gs://bucket/sw/0_lr0.001", "RUN_NAME": "0_lr0.001",
                   "EXTRA_ARGS": "--config.seed=2 --config.optim.lr=0.001"}
    gpu = shlex.split(sweep.launcher_command("gpu_slurm", spec, run, []))
    assert gpu[-3:] == ["sbatch", "--job-name=0_lr0.001", "launch/gpu_slurm.sbatch"]

    out = host_limits.run([sys.executable, "-m", "clus_jax.sweep", "--config", spec, "--workdir", str(tmp_path / "d"),
                          "--launcher", "gpu_slurm"], cwd=ROOT, capture_output=True, text=True, base_s=120)
    assert out.returncode == 0 and out.stdout.count("sbatch --job-name=") == 1
    assert not (tmp_path / "d").exists()  # printing commands creates nothing


def _metrics(workdir: pathlib.Path, records: list[dict]) -> None:
    workdir.mkdir(parents=True)
    (workdir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + '{"step": 3, "tr')


def test_collect_writes_one_row_per_run(tmp_path):
    spec = _write_config(tmp_path, '[{"optim.lr": 1e-3}, {"optim.lr": 3e-4}, {"optim.lr": 1e-4}, {"seed": 3}]')
    runs = sweep.expand(spec + ":steps=4", str(tmp_path / "sw"))
    _metrics(pathlib.Path(runs[0].workdir), [
        {"step": 2, "train/loss": 3.0, "train/clip/loss": 3.0},
        {"step": 4, "train/loss": 2.5, "data/skipped": 0},
        {"step": 4, "zeroshot/easyvqa/top1": 0.25, "eval/seconds": 1.0},
    ])
    _metrics(pathlib.Path(runs[1].workdir), [{"step": 2, "train/loss": 3.1}])
    _metrics(pathlib.Path(runs[2].workdir), [{"step": 4, "train/loss": float("nan")}])
    (pathlib.Path(runs[2].workdir) / sweep.RUN_FILE).write_text(json.dumps({"returncode": 1}))

    rows = sweep.collect(str(tmp_path / "sw"), runs)
    assert [r["status"] for r in rows] == ["finished", "incomplete", "failed", "missing"]
    with open(tmp_path / "sw/results.csv") as f:
        table = list(csv.DictReader(f))
    assert list(table[0]) == ["name", "overrides", "status", "step", "train/loss", "zeroshot/easyvqa/top1"]
    assert table[0]["overrides"] == "optim.lr=0.001" and float(table[0]["train/loss"]) == 2.5
    assert float(table[0]["zeroshot/easyvqa/top1"]) == 0.25 and table[1]["zeroshot/easyvqa/top1"] == ""
    md = (tmp_path / "sw/results.md").read_text().splitlines()
    assert md[0] == "| name | overrides | status | step | train/loss | zeroshot/easyvqa/top1 |"
    assert md[2] == "| 0_lr0.001 | optim.lr=0.001 | finished | 4 | 2.5000 | 0.2500 |"
    assert len(md) == 2 + len(runs)

    # --collect alone finds the runs again from the directory
    (tmp_path / "sw" / "results.md").unlink()
    out = host_limits.run([sys.executable, "-m", "clus_jax.sweep", "--workdir", str(tmp_path / "sw"), "--collect"],
                          cwd=ROOT, capture_output=True, text=True, base_s=120)
    assert out.returncode == 1  # not every run finished
    assert "| 0_lr0.001 |" in out.stdout and (tmp_path / "sw/results.md").exists()


@pytest.mark.slow
def test_local_sweep_end_to_end(tmp_path):
    """configs/clip.py's sweep on a tiny synthetic model: every run trains, then results.{csv,md}."""
    out = host_limits.run(
        [sys.executable, "-m", "clus_jax.sweep", "--config", "configs/clip.py:steps=2,batch=16,synthetic",
         "--workdir", str(tmp_path), *TINY],
        cwd=ROOT, capture_output=True, text=True, base_s=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    points = sweep.sweep_points(str(ROOT / "configs/clip.py"))
    with open(tmp_path / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(points) >= 3
    assert [r["status"] for r in rows] == ["finished"] * len(rows)
    assert all(float(r["train/loss"]) > 0 and r["zeroshot/easyvqa/top1"] != "" for r in rows)
    assert len({r["name"] for r in rows}) == len(rows)
    for row in rows:
        assert (tmp_path / row["name"] / "metrics.jsonl").exists()
        assert (tmp_path / row["name"] / "train.log").exists()
    assert (tmp_path / "results.md").read_text().count("| finished |") == len(rows)

    # a second invocation skips the finished runs
    again = host_limits.run(
        [sys.executable, "-m", "clus_jax.sweep", "--config", "configs/clip.py:steps=2,batch=16,synthetic",
         "--workdir", str(tmp_path), *TINY], cwd=ROOT, capture_output=True, text=True, base_s=300)
    assert again.returncode == 0 and again.stdout.count("already finished") == len(rows)


def test_clus_sweep_overrides_reach_the_config_the_trainer_parses(tmp_path, monkeypatch):
    """configs/clus.py's knob sweep: one knob per run around the default, and each run's command-line
    overrides, parsed as the trainer parses them (ml_collections config flags), give the intended values
    (a tuple of bank sizes, a string teacher) rather than failing or arriving as strings."""
    from absl import flags
    from ml_collections import config_flags

    monkeypatch.chdir(ROOT)
    spec = "configs/clus.py:steps=400,batch=128"
    runs = sweep.expand(spec, str(tmp_path))
    assert runs[0].overrides == {} and all(len(r.overrides) == 1 for r in runs[1:])
    assert {r.total_steps for r in runs} == {400}
    for run in runs:
        argv = ["train", "--config", spec, *run.override_args()]
        fv = flags.FlagValues()
        config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=False, sys_argv=argv)
        fv(argv)
        for key, value in run.overrides.items():
            node = fv.config
            for part in key.split("."):
                node = node[part]
            assert tuple(node) == tuple(value) if isinstance(value, tuple) else node == value, (key, node)
