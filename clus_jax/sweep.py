"""Hyper-parameter sweeps: a config's ``get_sweep()`` -> one run per override dict -> a results table.

    python -m clus_jax.sweep --config configs/clip.py[:ARGS] --workdir DIR [--config.KEY=VALUE ...]
        [--dry-run] [--launcher local|tpu_pod|gpu_slurm] [--processes N] [--collect]

A config file may define ``get_sweep()`` (or ``get_sweep(arg)``, given the same ``:ARGS`` string as
``get_config``) returning a list of dicts of dotted config keys to values, e.g.
``[{"optim.lr": 1e-3}, {"optim.lr": 3e-4}]``. Run ``i`` trains in ``DIR/<i>_<short name>`` with those
values passed as ``--config.KEY=VALUE`` after any common overrides given here.

``--launcher local`` (default) trains the runs one after another on this machine (``--processes N`` runs
each through ``launch/local.sh N``); finished runs are skipped, so re-running a sweep resumes it.
``tpu_pod`` and ``gpu_slurm`` print one launch command per run instead. After local runs, and with
``--collect`` alone, the last value of every metric in each run's ``metrics.jsonl`` goes into
``DIR/results.csv`` and ``DIR/results.md``: one row per run with its name, overrides, status, final
``train/loss`` and final evaluation metrics. ``--collect`` reads local directories only.
"""
from __future__ import annotations

import csv
import dataclasses
import inspect
import json
import math
import os
import posixpath
import re
import shlex
import subprocess
import sys
from typing import Any, Mapping, Sequence

from clus_jax.common import cli

LAUNCHERS = ("local", "tpu_pod", "gpu_slurm")
SWEEP_FILE = "sweep.json"
RUN_FILE = "sweep_run.json"
# Metric keys that are bookkeeping rather than results; everything else not under train/ is an eval metric.
_NOT_RESULTS = ("eval/seconds",)


@dataclasses.dataclass
class Run:
    """One point of a sweep."""

    index: int
    name: str
    overrides: dict[str, Any]
    workdir: str
    total_steps: int | None = None

    def override_args(self) -> list[str]:
        return [f"--config.{k}={format_value(v)}" for k, v in self.overrides.items()]


def format_value(value: Any) -> str:
    """A value as ml_collections' ``--config.KEY=VALUE`` parser reads it back."""
    if isinstance(value, str):
        return value
    if isinstance(value, float):
        return repr(value)
    return str(value)


def _short_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def run_name(index: int, overrides: Mapping[str, Any]) -> str:
    """0, {'optim.lr': 3e-4, 'optim.weight_decay': 0.1} -> '0_lr3e-04-weight_decay0.1' (path-safe).

    Each key is shortened to its last component, unless two keys share it (then the full dotted key).
    """
    leaves = [k.rsplit(".", 1)[-1] for k in overrides]
    parts = []
    for key, leaf in zip(overrides, leaves):
        label = leaf if leaves.count(leaf) == 1 else key
        parts.append(f"{label}{_short_value(overrides[key])}")
    short = re.sub(r"[^A-Za-z0-9._=+-]+", "-", "-".join(parts)).strip("-") or "base"
    return f"{index}_{short[:80]}"


def sweep_points(config_spec: str) -> list[dict[str, Any]]:
    """The override dicts of ``config_spec``'s ``get_sweep()``; a file without one gives one empty run."""
    from clus_jax.config.base import load_config_module

    path, _, arg = config_spec.partition(":")
    module = load_config_module(path)
    fn = getattr(module, "get_sweep", None)
    if fn is None:
        return [{}]
    points = fn(arg) if arg and inspect.signature(fn).parameters else fn()
    points = list(points)
    for i, p in enumerate(points):
        if not isinstance(p, Mapping):
            raise TypeError(f"get_sweep() item {i} is {type(p).__name__}, expected a dict of dotted keys to values")
    return [dict(p) for p in points]


def _parse_cli_override(arg: str) -> tuple[str, str]:
    key, _, value = arg[len("--config."):].partition("=")
    return key, value


def expand(config_spec: str, workdir: str, common_overrides: Sequence[str] = ()) -> list[Run]:
    """Runs of a sweep with their workdirs; every override key is checked against the config first.

    ``common_overrides`` are ``--config.KEY=VALUE`` strings applied to every run (before the sweep's own).
    """
    from clus_jax.config.base import get_dotted, load_config, set_dotted

    points = sweep_points(config_spec)
    common = dict(_parse_cli_override(a) for a in common_overrides)
    runs = []
    join = posixpath.join if "://" in workdir else os.path.join
    for index, overrides in enumerate(points):
        config = load_config(config_spec)
        for key in common:
            get_dotted(config, key)  # the trainer parses the value; here the key only has to exist
        for key, value in overrides.items():
            set_dotted(config, key, value)
        total = overrides.get("total_steps", common.get("total_steps", config.total_steps))
        name = run_name(index, overrides)
        runs.append(Run(index, name, overrides, join(workdir, name), int(total)))
    seen = [json.dumps(p, sort_keys=True, default=str) for p in points]
    if len(set(seen)) != len(seen):
        raise ValueError(f"get_sweep() gives the same overrides twice: {points}")
    return runs


def train_command(config_spec: str, run: Run, common_overrides: Sequence[str], processes: int = 1) -> list[str]:
    """The local command that trains ``run``."""
    args = ["--config", config_spec, "--workdir", run.workdir, *common_overrides, *run.override_args()]
    if processes > 1:
        script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "launch", "local.sh")
        return ["bash", os.path.relpath(script), str(processes), *args]
    return [sys.executable, "-m", "clus_jax.train", *args]


def launcher_command(launcher: str, config_spec: str, run: Run, common_overrides: Sequence[str]) -> str:
    """Shell command that launches ``run`` through ``launch/tpu_pod.sh`` or ``launch/gpu_slurm.sbatch``."""
    extra = " ".join(shlex.quote(a) for a in (*common_overrides, *run.override_args()))
    env = f"CONFIG={shlex.quote(config_spec)} WORKDIR={shlex.quote(run.workdir)} EXTRA_ARGS={shlex.quote(extra)}"
    if launcher == "tpu_pod":
        return f"{env} RUN_NAME={shlex.quote(run.name)} launch/tpu_pod.sh"
    if launcher == "gpu_slurm":
        return f"{env} sbatch --job-name={shlex.quote(run.name)} launch/gpu_slurm.sbatch"
    raise ValueError(f"unknown launcher {launcher!r}; choose from {LAUNCHERS}")


def read_final_metrics(workdir: str) -> tuple[dict[str, Any], int | None]:
    """(last value of every key, last step) from ``workdir/metrics.jsonl``; ({}, None) when absent.

    Read by ``read_metrics``: a line cut short by a crash is skipped with a warning naming the file and line."""
    from clus_jax.train.metrics_writer import METRICS_FILE, read_metrics  # here: the sweep's --help stays quick

    final: dict[str, Any] = {}
    last_step = None
    if not os.path.exists(os.path.join(workdir, METRICS_FILE)):
        return final, None
    for record in read_metrics(workdir):
        step = record.pop("step")
        last_step = step if last_step is None else max(last_step, step)
        final.update({k: v for k, v in record.items() if v is not None})
    return final, last_step


def _run_status(run: Run) -> tuple[str, dict[str, Any], int | None]:
    metrics, step = read_final_metrics(run.workdir)
    returncode = None
    info_path = os.path.join(run.workdir, RUN_FILE)
    if os.path.exists(info_path):
        with open(info_path) as f:
            returncode = json.load(f).get("returncode")
    if step is None:
        status = "failed" if returncode not in (None, 0) else "missing"
    elif run.total_steps is not None and step >= run.total_steps and returncode in (None, 0):
        status = "finished"
    else:
        status = "failed" if returncode not in (None, 0) else "incomplete"
    return status, metrics, step


def is_result_key(key: str) -> bool:
    return not key.startswith(("train/", "data/")) and key not in _NOT_RESULTS


def collect(workdir: str, runs: Sequence[Run]) -> list[dict[str, Any]]:
    """Writes ``results.csv`` and ``results.md`` in ``workdir``; returns the rows."""
    rows = []
    for run in runs:
        status, metrics, step = _run_status(run)
        row = {"name": run.name, "overrides": " ".join(f"{k}={format_value(v)}" for k, v in run.overrides.items()),
               "status": status, "step": step, "train/loss": metrics.get("train/loss")}
        row.update({k: v for k, v in metrics.items() if is_result_key(k)})
        rows.append(row)
    columns = ["name", "overrides", "status", "step", "train/loss"]
    columns += sorted({k for row in rows for k in row} - set(columns))
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "results.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({c: "" if row.get(c) is None else row[c] for c in columns})

    def cell(value: Any) -> str:
        if value is None:
            return ""
        if isinstance(value, float):
            return "nan" if not math.isfinite(value) else f"{value:.4f}"
        return str(value).replace("|", "\\|")

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in rows]
    with open(os.path.join(workdir, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return rows


def _save_sweep(workdir: str, config_spec: str, common: Sequence[str], runs: Sequence[Run]) -> None:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, SWEEP_FILE), "w") as f:
        json.dump({"config": config_spec, "common_overrides": list(common),
                   "runs": [dataclasses.asdict(r) for r in runs]}, f, indent=1)


def _load_sweep(workdir: str) -> list[Run]:
    path = os.path.join(workdir, SWEEP_FILE)
    if os.path.exists(path):
        with open(path) as f:
            return [Run(**r) for r in json.load(f)["runs"]]
    # No sweep file: every sub-directory with metrics is a run.
    subdirs = sorted(d for d in os.listdir(workdir) if os.path.exists(os.path.join(workdir, d, "metrics.jsonl")))
    return [Run(i, d, {}, os.path.join(workdir, d)) for i, d in enumerate(subdirs)]


def run_local(config_spec: str, runs: Sequence[Run], common: Sequence[str], processes: int = 1) -> list[Run]:
    """Trains each unfinished run in turn (output to ``<run>/train.log`` and here); returns the failed runs."""
    failed = []
    for run in runs:
        status, _, _ = _run_status(run)
        if status == "finished":
            print(f"sweep: {run.name}: already finished, skipped", flush=True)
            continue
        os.makedirs(run.workdir, exist_ok=True)
        cmd = train_command(config_spec, run, common, processes)
        print(f"sweep: {run.name}: {shlex.join(cmd)}", flush=True)
        with open(os.path.join(run.workdir, "train.log"), "a") as log:
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for line in proc.stdout:
                log.write(line)
                sys.stdout.write(f"[{run.name}] {line}")
            returncode = proc.wait()
        with open(os.path.join(run.workdir, RUN_FILE), "w") as f:
            json.dump({"name": run.name, "overrides": run.overrides, "command": cmd, "returncode": returncode}, f)
        if returncode != 0:
            print(f"sweep: {run.name}: failed with status {returncode} (log: {run.workdir}/train.log)", flush=True)
            failed.append(run)
    return failed


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry; returns the exit status (non-zero when a run failed)."""
    parser = cli.ArgumentParser(prog="python -m clus_jax.sweep", description=__doc__.split("\n\n")[0],
                                epilog="Other --config.KEY=VALUE arguments apply to every run.")
    parser.add_argument("--config", help="config file with get_sweep(), optionally :ARGS")
    parser.add_argument("--workdir", required=True, help="sweep directory; run i trains in WORKDIR/<i>_<name>")
    parser.add_argument("--launcher", choices=LAUNCHERS, default="local")
    parser.add_argument("--processes", type=int, default=1, help="local processes per run (via launch/local.sh)")
    parser.add_argument("--dry-run", action="store_true", help="print the runs' commands, run nothing")
    parser.add_argument("--collect", action="store_true", help="only collect results of existing runs")
    args, rest = parser.parse_known_args(argv)
    bad = [a for a in rest if not a.startswith("--config.")]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)}")

    if args.collect and not args.config:
        runs = cli.run_command(lambda: _load_sweep(args.workdir))  # a missing --workdir is one error line
    else:
        if not args.config:
            parser.error("--config is required (unless --collect)")
        try:
            runs = expand(args.config, args.workdir, rest)
        except (FileNotFoundError, SyntaxError, KeyError, TypeError, ValueError) as e:
            cli.fail(f"--config {args.config}: {cli.error_text(e)}")
    if args.collect:
        if not any(os.path.isdir(run.workdir) for run in runs):  # nothing to collect: write no results there
            cli.fail(f"--workdir {args.workdir} holds no run of the sweep (no {SWEEP_FILE}, no run directory with "
                     f"metrics.jsonl); nothing to collect", code=1)
        rows = collect(args.workdir, runs)
        print(open(os.path.join(args.workdir, "results.md")).read(), end="")
        return 0 if all(r["status"] == "finished" for r in rows) else 1

    if args.launcher != "local":
        for run in runs:
            print(launcher_command(args.launcher, args.config, run, rest))
        return 0
    if args.dry_run:
        for run in runs:
            print(shlex.join(train_command(args.config, run, rest, args.processes)))
        return 0
    _save_sweep(args.workdir, args.config, rest, runs)
    failed = run_local(args.config, runs, rest, args.processes)
    collect(args.workdir, runs)
    print(open(os.path.join(args.workdir, "results.md")).read(), end="")
    if failed:
        print(f"sweep: {len(failed)} of {len(runs)} runs failed: {', '.join(r.name for r in failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
