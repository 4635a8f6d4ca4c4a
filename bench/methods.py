"""Every method at equal compute: each method's config trained on the embedded data with the same global
batch, steps and towers, for several seeds, summarised as one table of mean ± std.

    python bench/methods.py --workdir /tmp/clus_jax/methods                      # 7 methods x 3 seeds
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

Methods that are recipes (``RECIPES``: MLCD, MoDE) run ``python -m clus_jax.recipe`` in ``DIR/<method>_s<seed>``
with the same budget split over their train stages, so that the steps of all stages add up to the steps of
one CLIP run (the offline embed and cluster stages are extra, and in the wall time):

- MLCD: the MLCD stage (the image tower from random init, on k-means labels) for 3/4 of the steps, the LiT
  stage (that tower frozen, a new text tower) for 1/4; figures from the LiT stage's evaluation. The labels
  come from a teacher that is not part of the budget (``TEACHERS``): the default CLIP run (``configs/clip.py``
  at its own 600 steps of batch 64), trained once in ``DIR/clip_teacher``; every seed embeds with it
  (``teacher=DIR/clip_teacher``) and clusters in its own folder, in its wall time. The teacher's figures and
  wall time are a row of their own, ``clip_teacher``;
- MoDE: a seed run of 84% of the steps (the paper's epoch 27 of 32) and two data experts that each resume it
  (``init_from.mode='resume'``: parameters, optimizer state, schedule position) for the schedule's last
  5/37 (292 + 2 x 54 at 400 steps); figures from the MoDE (metadata) ensemble of ``clus_jax.ensemble``
  (zero-shot and retrieval only: an ensemble has no single image embedding for a probe, k-NN or k-means).
  The dense baseline is the ``clip`` row; ``DIR/mode_s<seed>/ensemble_2/ensemble.md`` has each expert,
  the best one and the uniform average.

Two rows measure Clus's parts: ``swap`` is its swap term alone (``clip=0``), and ``clus_teacher`` takes its
codes from a frozen teacher (``teacher=DIR/clip_teacher``, the same shared teacher as MLCD's, with its own
towers and frozen random banks of the student's K) instead of the EMA of the student.

The seed of a recipe goes to each of its train stages and to its clustering, not to a shared teacher.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence

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
    "swap": "configs/clus.py,clip=0",  # Clus's swap term alone (CLIP's weight 0; its loss still logged)
    "clus_teacher": "configs/clus.py",  # Clus with codes from a frozen, independently trained teacher (TEACHERS)
    "brivl": "configs/brivl.py",
}


def mlcd_split(steps: int) -> tuple[int, int]:
    """(mlcd, lit) steps: 3 steps/4 + steps/4 = steps (the teacher is outside the budget)."""
    return steps - steps // 4, steps // 4


def mlcd_args(steps: int, batch: int, seed: int) -> str:
    mlcd, lit = mlcd_split(steps)
    return f"steps={mlcd},lit_steps={lit},batch={batch},seed={seed}"


MODE_EXPERTS = 2  # configs/mode.py's coarse clusters, each with an expert


def mode_args(steps: int, batch: int, seed: int) -> str:
    """The paper's split (MoDE: the seed is epoch 27 of 32, 84% of the schedule): each expert resumes the seed for
    the schedule's last 5/32, so seed + two experts = steps (292 + 2 x 54 at 400); no dense baseline (the clip
    row is one)."""
    expert = steps * 5 // 37
    return (f"seed_steps={steps - MODE_EXPERTS * expert},expert_steps={expert},batch={batch},dense=0,"
            f"seed={seed}")


def finished_metrics(workdir: str, steps: int) -> dict[str, float] | None:
    """The numeric final metrics of the train run in ``workdir``, or None before it reached ``steps``."""
    metrics, step = sweep.read_final_metrics(workdir)
    if step is None or step < steps:
        return None
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float))}


def lit_stage_metrics(workdir: str, steps: int) -> dict[str, float] | None:
    """The final metrics of the recipe's ``lit_s<seed>`` stage (``workdir`` is ``DIR/mlcd_s<seed>``), or None
    before it finished."""
    seed = os.path.basename(os.path.normpath(workdir)).rsplit("_s", 1)[1]
    return finished_metrics(os.path.join(workdir, f"lit_s{seed}"), mlcd_split(steps)[1])


def ensemble_metrics(workdir: str, steps: int) -> dict[str, float] | None:
    """The ``ensemble`` row of the recipe's ``ensemble_<experts>/ensemble.json``, or None before it exists."""
    del steps
    path = os.path.join(workdir, f"ensemble_{MODE_EXPERTS}", "ensemble.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return {k: float(v) for k, v in json.load(f)["rows"]["ensemble"].items()}


# method -> (recipe config, (steps, batch, seed) -> its :ARGS, (workdir, steps) -> final metrics or None)
RECIPES: dict[str, tuple[str, Callable[[int, int, int], str], Callable[[str, int], dict | None]]] = {
    "mlcd": ("configs/mlcd.py", mlcd_args, lit_stage_metrics),
    "mode": ("configs/mode.py", mode_args, ensemble_metrics),
}
# method -> (run name, config) of the teacher its seeds share: trained once in DIR/<name> before them (one run
# per name, whichever methods share it), passed to each as teacher=DIR/<name>, its cost outside the method's
# budget and row (a row of its own).
TEACHERS: dict[str, tuple[str, str]] = {"mlcd": ("clip_teacher", "configs/clip.py"),
                                        "clus_teacher": ("clip_teacher", "configs/clip.py")}
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
        from clus_jax.config.base import load_config

        queue = int(load_config(METHODS[method].partition(",")[0]).brivl.queue_length)
        return [f"--config.brivl.queue_length={max(1, round(queue / batch)) * batch}"]
    return []


def plan(workdir: str, methods: Sequence[str], seeds: Sequence[int], steps: int,
         batch: int) -> list[tuple[str, str, sweep.Run, list[str]]]:
    """(method, config spec, run, common overrides) for every method and seed."""
    out = []
    for method in methods:
        if method not in METHODS and method not in RECIPES:
            raise KeyError(f"unknown method {method!r}; known: {sorted([*METHODS, *RECIPES])}")
        teacher = f",teacher={teacher_run(method, workdir).workdir}" if method in TEACHERS else ""
        for seed in seeds:
            name = f"{method}_s{seed}"
            if method in RECIPES:
                path, args, _ = RECIPES[method]
                run = sweep.Run(index=len(out), name=name, overrides={}, workdir=os.path.join(workdir, name),
                                total_steps=steps)
                out.append((method, f"{path}:{args(steps, batch, seed)}{teacher}", run, []))
                continue
            run = sweep.Run(index=len(out), name=name, overrides={"seed": seed},
                            workdir=os.path.join(workdir, name), total_steps=steps)
            out.append((method, config_spec(method, steps, batch) + teacher, run, method_overrides(method, batch)))
    return out


def teacher_run(method: str, workdir: str) -> sweep.Run:
    """The shared teacher of method ``method`` in ``workdir``, at its config's own length."""
    from clus_jax.config.base import load_config

    name, config = TEACHERS[method]
    return sweep.Run(index=0, name=name, overrides={}, workdir=os.path.join(workdir, name),
                     total_steps=int(load_config(config).total_steps))


def _teachers(planned) -> list[tuple[str, str, sweep.Run]]:
    """(method, config, run) of every shared teacher the planned runs use, once per teacher run."""
    seen = {}
    for m, _, run, _ in planned:
        if m in TEACHERS:
            teacher = teacher_run(m, os.path.dirname(run.workdir))
            seen.setdefault(teacher.workdir, (m, TEACHERS[m][1], teacher))
    return list(seen.values())


def recipe_command(spec: str, run: sweep.Run) -> list[str]:
    """The command that runs (or resumes) a recipe method's stages in the run's workdir."""
    return [sys.executable, "-m", "clus_jax.recipe", "--config", spec, "--workdir", run.workdir]


def run_metrics(method: str, run: sweep.Run) -> dict[str, float] | None:
    """A finished run's final metrics (result keys, ``train/loss`` where there is one), None before it ends."""
    if method in RECIPES:
        return RECIPES[method][2](run.workdir, run.total_steps or 0)
    return finished_metrics(run.workdir, run.total_steps or 0)


def train_all(planned, extra_overrides: Sequence[str]) -> list[str]:
    """Trains every unfinished run in turn, timing each; returns the names of failed runs."""
    from clus_jax.data import embedded

    embedded.build_embedded_dataset()  # once, outside every run's wall time
    failed = []
    for _, config, teacher in _teachers(planned):  # before the runs that embed with it; timed on its own
        start = time.perf_counter()
        if sweep.run_local(config, [teacher], []):
            return [teacher.name]  # nothing can embed with it
        _write_timing(teacher.workdir, time.perf_counter() - start)
    for method, spec, run, overrides in planned:
        start = time.perf_counter()
        if method in RECIPES:
            finished = run_metrics(method, run) is not None
            bad = not finished and subprocess.run(recipe_command(spec, run), cwd=REPO_ROOT).returncode != 0
        else:
            bad = sweep.run_local(spec, [run], [*overrides, *extra_overrides])
        seconds = time.perf_counter() - start
        if bad:
            failed.append(run.name)
        else:
            _write_timing(run.workdir, seconds)
    return failed


def _write_timing(workdir: str, seconds: float) -> None:
    if seconds > 5:  # a finished run skipped by run_local keeps its recorded time
        with open(os.path.join(workdir, TIMING_FILE), "w") as f:
            json.dump({"wall_seconds": round(seconds, 1)}, f)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarise(planned) -> tuple[list[str], dict[str, dict[str, tuple[float, float, int]]]]:
    """(columns, {method: {column: (mean, std, n)}}) over the finished runs of each method; a shared teacher
    (``TEACHERS``) is a row of its own under its run's name."""
    per_method: dict[str, dict[str, list[float]]] = {}
    results = [(method, run, run_metrics(method, run)) for method, _, run, _ in planned]
    results += [(t.name, t, finished_metrics(t.workdir, t.total_steps)) for _, _, t in _teachers(planned)]
    for method, run, metrics in results:
        if metrics is None:
            continue
        values = {k: float(v) for k, v in metrics.items() if sweep.is_result_key(k)}
        if "train/loss" in metrics:  # a recipe's result (MoDE's ensemble) may have none
            values["train/loss"] = metrics["train/loss"]
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
    p.add_argument("--methods", default=",".join([*METHODS, *RECIPES]),
                   help="comma-separated names of METHODS and RECIPES")
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
    if rest and any(m in RECIPES for m, *_ in planned):
        p.error(f"{' '.join(rest)}: --config overrides apply to single-config methods only, not to "
                f"{', '.join(sorted({m for m, *_ in planned if m in RECIPES}))}")
    if args.dry_run:
        for _, config, teacher in _teachers(planned):
            print(" ".join(sweep.train_command(config, teacher, [])))
        for method, spec, run, overrides in planned:
            command = (recipe_command(spec, run) if method in RECIPES
                       else sweep.train_command(spec, run, [*overrides, *rest]))
            print(" ".join(command))
        return 0
    failed = [] if args.collect else train_all(planned, rest)
    print(write_table(args.workdir, *summarise(planned)), end="")
    if failed:
        print(f"methods: {len(failed)} runs failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
