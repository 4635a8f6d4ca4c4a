"""Every method at equal compute: each method's config trained on the embedded data with the same global
batch, steps and towers, for several seeds, summarised as one table of mean ± std.

    python bench/methods.py --workdir /tmp/clus_jax/methods                      # 5 methods x 3 seeds
    python bench/methods.py --workdir DIR --methods clip,clus --seeds 2 --steps 200
    python bench/methods.py --workdir DIR --collect                              # table of finished runs
    python bench/methods.py --workdir DIR --dry-run                              # print the commands

Run ``<method>_s<seed>`` trains in ``DIR/<method>_s<seed>`` through ``clus_jax.sweep`` (finished runs are
skipped, so re-running resumes the benchmark). Every config is given the same ``steps=`` and ``batch=``
arguments (so the same warm-up and checkpoint cadence) and ``--config.seed``; towers are the configs'
shared defaults. Wall time is timed around each run (the embedded dataset is built before the first).
The table (``DIR/methods.md``, ``DIR/methods.csv``) has one row per method and, for each metric present in
the runs' final ``metrics.jsonl`` records, the mean ± sample std over seeds (every metric in the CSV;
the key ones, each ``cluster/.../*_nmi`` the evaluation writes and the wall time in the Markdown). A method joins by adding a line to ``METHODS``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Sequence

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

from clus_jax import sweep  # noqa: E402

# method -> config file. Extra config arguments of a method (besides steps and batch) go after a comma.
METHODS: dict[str, str] = {
    "clip": "configs/clip.py",
    "siglip": "configs/siglip.py",
    "clip_reg": "configs/clip_reg.py",
    "clus": "configs/clus.py",
    "brivl": "configs/brivl.py",
}
# The table's leading columns, in this order, when present; other result keys follow sorted.
KEY_METRICS = (
    "zeroshot/easyvqa/top1",
    "zeroshot/emoji_category/top1",
    "retrieval/emoji_heldout/i2t_r1",
    "retrieval/emoji_heldout/i2t_r10",
    "retrieval/emoji_heldout/t2i_r1",
    "retrieval/emoji_heldout/t2i_r10",
    "retrieval/emoji_openmoji/i2t_r10",
    "retrieval/emoji_openmoji/t2i_r10",
    "probe/easyvqa/linear_top1",
    "probe/easyvqa/knn_top1",
)
TIMING_FILE = "bench_time.json"
DEFAULT_STEPS = 400
DEFAULT_BATCH = 128


def config_spec(method: str, steps: int, batch: int) -> str:
    """``configs/<method>.py:steps=S,batch=B[,method args]``: the same budget for every method."""
    path, _, extra = METHODS[method].partition(",")
    return f"{path}:steps={steps},batch={batch}" + (f",{extra}" if extra else "")


def method_overrides(method: str, batch: int) -> list[str]:
    """Overrides a method needs to run at ``batch``: BriVL's queue length stays a multiple of the batch."""
    if method == "brivl":
        from clus_jax.config_base import load_config

        queue = int(load_config(METHODS[method].partition(",")[0]).brivl.queue_length)
        return [f"--config.brivl.queue_length={max(1, round(queue / batch)) * batch}"]
    return []


def plan(workdir: str, methods: Sequence[str], seeds: Sequence[int], steps: int,
         batch: int) -> list[tuple[str, str, sweep.Run, list[str]]]:
    """(method, config spec, run, common overrides) for every method and seed."""
    out = []
    for method in methods:
        if method not in METHODS:
            raise KeyError(f"unknown method {method!r}; known: {sorted(METHODS)}")
        spec = config_spec(method, steps, batch)
        for seed in seeds:
            name = f"{method}_s{seed}"
            run = sweep.Run(index=len(out), name=name, overrides={"seed": seed},
                            workdir=os.path.join(workdir, name), total_steps=steps)
            out.append((method, spec, run, method_overrides(method, batch)))
    return out


def train_all(planned, extra_overrides: Sequence[str]) -> list[str]:
    """Trains every unfinished run in turn, timing each; returns the names of failed runs."""
    from clus_jax.data import embedded

    embedded.build_embedded_dataset()  # once, outside every run's wall time
    failed = []
    for _, spec, run, overrides in planned:
        start = time.perf_counter()
        bad = sweep.run_local(spec, [run], [*overrides, *extra_overrides])
        seconds = time.perf_counter() - start
        if bad:
            failed.append(run.name)
        elif seconds > 5:  # a finished run skipped by run_local keeps its recorded time
            with open(os.path.join(run.workdir, TIMING_FILE), "w") as f:
                json.dump({"wall_seconds": round(seconds, 1)}, f)
    return failed


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarise(planned) -> tuple[list[str], dict[str, dict[str, tuple[float, float, int]]]]:
    """(columns, {method: {column: (mean, std, n)}}) over the finished runs of each method."""
    per_method: dict[str, dict[str, list[float]]] = {}
    for method, _, run, _ in planned:
        metrics, step = sweep.read_final_metrics(run.workdir)
        if step is None or step < (run.total_steps or 0):
            continue
        values = {k: float(v) for k, v in metrics.items() if sweep.is_result_key(k) and isinstance(v, (int, float))}
        values["train/loss"] = metrics.get("train/loss", math.nan)
        timing = os.path.join(run.workdir, TIMING_FILE)
        if os.path.exists(timing):
            with open(timing) as f:
                values["wall_seconds"] = float(json.load(f)["wall_seconds"])
        for key, value in values.items():
            per_method.setdefault(method, {}).setdefault(key, []).append(value)
    present = {k for cols in per_method.values() for k in cols}
    columns = [k for k in KEY_METRICS if k in present]
    columns += sorted(present - set(columns) - {"train/loss", "wall_seconds"})
    columns += [k for k in ("wall_seconds",) if k in present]
    table = {m: {k: (*mean_std(v), len(v)) for k, v in cols.items()} for m, cols in per_method.items()}
    return columns, table


def _short(column: str) -> str:
    return column.replace("retrieval/", "").replace("zeroshot/", "zs/").replace("probe/", "")


def write_table(workdir: str, columns: Sequence[str], table) -> str:
    """Writes ``methods.md`` (the key metrics, NMI and wall time) and ``methods.csv`` (every column) in
    ``workdir``; returns the Markdown."""
    seeds = {m: max(v[2] for v in cols.values()) for m, cols in table.items()}
    shown = [c for c in columns if c in KEY_METRICS or c == "wall_seconds" or
             (c.startswith("cluster/") and c.endswith("_nmi"))]
    lines = ["| method | seeds | " + " | ".join(_short(c) for c in shown) + " |",
             "|---|---|" + "---|" * len(shown)]
    csv_lines = ["method,seeds," + ",".join(f"{c} mean,{c} std" for c in columns)]
    for method, cols in table.items():
        def cell(c):
            if c not in cols:
                return ""
            mean, std, _ = cols[c]
            return f"{mean:.0f} ± {std:.0f}" if c == "wall_seconds" else f"{mean:.3f} ± {std:.3f}"
        lines.append(f"| {method} | {seeds[method]} | " + " | ".join(cell(c) for c in shown) + " |")
        csv_lines.append(f"{method},{seeds[method]}," + ",".join(
            f"{cols[c][0]:.6g},{cols[c][1]:.6g}" if c in cols else "," for c in columns))
    text = "\n".join(lines) + "\n"
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "methods.md"), "w") as f:
        f.write(text)
    with open(os.path.join(workdir, "methods.csv"), "w") as f:
        f.write("\n".join(csv_lines) + "\n")
    return text


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="Other --config.KEY=VALUE arguments apply to every run.")
    p.add_argument("--workdir", required=True)
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated names of METHODS")
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 per method")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    p.add_argument("--batch", type=int, default=DEFAULT_BATCH)
    p.add_argument("--collect", action="store_true", help="only write the table of existing runs")
    p.add_argument("--dry-run", action="store_true", help="print every run's command, run nothing")
    args, rest = p.parse_known_args(argv)
    bad = [a for a in rest if not a.startswith("--config.")]
    if bad:
        p.error(f"unrecognized arguments: {' '.join(bad)}")
    try:
        planned = plan(args.workdir, [m for m in args.methods.split(",") if m], range(args.seeds),
                       args.steps, args.batch)
    except KeyError as e:
        p.error(str(e.args[0]))
    if args.dry_run:
        for _, spec, run, overrides in planned:
            print(" ".join(sweep.train_command(spec, run, [*overrides, *rest])))
        return 0
    failed = [] if args.collect else train_all(planned, rest)
    print(write_table(args.workdir, *summarise(planned)), end="")
    if failed:
        print(f"methods: {len(failed)} runs failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
