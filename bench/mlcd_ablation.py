"""MLCD's ablations on the embedded data (the paper's Table 5 at this scale): l = 1 against 8 positive labels,
the Partial-FC sampling rate r = 1.0 against 0.1 at a K where sampling drops centres, margin 0 against 0.3.

    python bench/mlcd_ablation.py                        # 5 rows x 3 seeds; the default teacher trained once
    python bench/mlcd_ablation.py --teacher DIR          # a finished run or an open_clip checkpoint folder
    python bench/mlcd_ablation.py --collect              # the table of the finished runs only
    python bench/mlcd_ablation.py --quick                # 3 tiny rows end to end, 1 seed (the smoke test's)

The teacher only labels the data, as in the paper (k-means of an off-the-shelf CLIP's features). By default it
is configs/clip.py at its own length (600 steps of batch 64), trained once into the cache folder
($CLUS_JAX_CACHE or ~/.cache/clus_jax, in bench/mlcd_ablation/teacher; remove it to train it again) and reused
by every later call; its cost is in no row. It embeds the 7,370 training images once (``WORKDIR/embed``),
and k-means (cosine, seed 0) runs once per K with the top-l labels of the largest l of that K; a row with
fewer labels takes the nearest ones of the same clustering.

Every row trains the MLCD stage alone (``configs/mlcd.py``: the image tower from random initialisation, the
classifier started from the k-means centres, ``--centres random`` for unicom's N(0, 0.01)) for the same
student budget, 200 steps of batch 128, seeds 0-2, in ``WORKDIR/<row>_s<seed>``, and reads the linear probe
and the k-NN of its image tower on easy-VQA from the run's final evaluation (easy-VQA's probe set of the
embedded dataset; chance 0.042). Finished runs are skipped, so a re-run resumes. Rows:

  row         K      l   r     margin
  base        256    8   1.0   0.3     the recipe's defaults
  l1          256    1   1.0   0.3     the nearest centre only
  margin0     256    8   1.0   0.0
  k2048_r1    2,048  1   1.0   0.3
  k2048_r01   2,048  1   0.1   0.3     Partial-FC sampling (the paper's r)

What sampling does at K = 2,048. Partial-FC scores ``int(r * K)`` centres per step and device (unicom's
``num_sample``): every positive label of the batch, then random negatives up to that number; when a batch
holds more distinct positives than that, it keeps a random subset of them and no negative. At K = 256 the
8 labels of 128 images are about a thousand label slots that cover nearly all 256 centres, so r = 0.1 (25
centres) would drop positives, not negatives: the rows at K = 256 keep r = 1.0. For r to drop only
negatives, ``int(r * K)`` must be well above the distinct positives of a batch: with l = 8 at batch 128 that
means K above ~10,000, more centres than the 7,370 images; a smaller batch would change the student budget.
So the r rows take l = 1 (at most 128 distinct positives per batch) and K = 2,048 (3.6 images per centre):
r = 0.1 scores 204 centres per step, all of the batch's positives (at most 128; about 124 if the centres
were equally full) and the rest, about 80, random negatives of the ~1,920 others (about 4% of them);
r = 1.0 scores all 2,048. The table prints, per row, the distinct positives of a batch (measured on the
labels), the centres scored and the negatives kept per step. On several devices each device samples its own
share of the centres.

Prints one table (mean +- sample std over seeds) and JSON lines: one per row (per-seed values, min and max,
the sampling figures), one for the teacher (its path and, for a run, its own probe and wall seconds), each
with the host (processor model and its measured float32 matmul rate, bench/host.py).

Expected run time on a 2-core AMD EPYC (AVX2, XLA float32 matmul 60-150 GFLOP/s as the load goes): the
teacher once, 4.5-10 minutes (the README's default run); the embedding and the two k-means about a minute;
each of the 15 runs about 2.5 minutes (200 MLCD steps at 0.8x a CLIP step, bench/step.py, plus start-up and
one evaluation): 45-50 minutes in all, about 40 once the teacher is cached. --quick: about 2 minutes of CPU.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import statistics
import sys
import tempfile
from collections.abc import Sequence
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (puts the repository on sys.path)
import host  # noqa: E402

from clus_jax import recipe  # noqa: E402
from clus_jax.recipe import Stage  # noqa: E402

PROBE, KNN = "probe/easyvqa/linear_top1", "probe/easyvqa/knn_top1"


@dataclasses.dataclass(frozen=True)
class Row:
    """One setting of the MLCD stage: K centres, l labels per image, sampling rate r, margin m."""

    name: str
    k: int
    labels: int
    rate: float
    margin: float


ROWS = (Row("base", 256, 8, 1.0, 0.3), Row("l1", 256, 1, 1.0, 0.3), Row("margin0", 256, 8, 1.0, 0.0),
        Row("k2048_r1", 2048, 1, 1.0, 0.3), Row("k2048_r01", 2048, 1, 0.1, 0.3))
# --quick: three rows on 512 synthetic records at tiny sizes, every path of the full run (two Ks, a row on the
# nearest labels of a top-4 clustering, sampling: K = 256 with r = 0.1 scores 25 centres for the at most 16
# positives of a batch of 16).
QUICK_ROWS = (Row("base", 16, 4, 1.0, 0.3), Row("l1", 16, 1, 1.0, 0.3), Row("k256_r01", 256, 1, 0.1, 0.3))
TEACHER = "configs/clip.py"
QUICK_RECORDS = 512
QUICK_TOWERS = "size=mu,text_size=mu,image_size=16,synthetic"


def student_spec(row: Row, steps: int, batch: int, quick: bool) -> str:
    """The MLCD stage of ``row``: configs/mlcd.py at the student budget (tiny towers on synthetic data for --quick)."""
    return (f"configs/mlcd.py:k={row.k},labels={row.labels},steps={steps},batch={batch}"
            + (f",{QUICK_TOWERS}" if quick else ""))


def teacher_stage(quick: bool) -> Stage:
    """The default teacher: configs/clip.py at its own length (--quick: 2 steps of tiny towers, no evaluation)."""
    if quick:
        return Stage("teacher", train=f"{TEACHER}:steps=2,batch=16,{QUICK_TOWERS}",
                     overrides={"data.synthetic_size": QUICK_RECORDS, "evals.run": "none"})
    return Stage("teacher", train=TEACHER)


def labels_path(workdir: str, k: int, labels: int, topk: int) -> str:
    """The side file of the l nearest centres at K: the clustering's own, or its first l columns."""
    if labels == topk:
        return os.path.join(workdir, f"cluster_k{k}", "labels")
    return os.path.join(workdir, f"labels_k{k}_l{labels}.npy")


def offline_stages(teacher: str, rows: Sequence[Row], quick: bool) -> tuple[list[Stage], dict[int, int]]:
    """(embed and one clustering per K, {K: its top-l}): the teacher's image embeddings, k-means, labels."""
    data = ["--data.source=synthetic", f"--data.synthetic_size={QUICK_RECORDS}"] if quick else ["--data.source=embedded"]
    topk: dict[int, int] = {}
    for row in rows:
        topk[row.k] = max(topk.get(row.k, 0), row.labels)
    stages = [Stage("embed", module="clus_jax.embed",
                    args=["--workdir", teacher, "--out", "{workdir}", "--modality", "image", *data])]
    stages += [Stage(f"cluster_k{k}", module="clus_jax.cluster", outputs={"labels": "labels"},
                     args=["--features", "{embed}", "--field", "image_emb", "--k", str(k), "--metric", "cosine",
                           "--topk", str(l), "--assign-to", "{workdir}/labels", "--out", "{workdir}", "--seed", "0"])
               for k, l in topk.items()]
    return stages, topk


def train_stages(workdir: str, rows: Sequence[Row], topk: dict[int, int], seeds: Sequence[int], steps: int,
                 batch: int, centres: str, quick: bool) -> list[Stage]:
    """One MLCD stage per row and seed, the same student budget in every one."""
    from clus_jax.data.side_fields import CENTERS_FILE

    stages = []
    for row in rows:
        for seed in seeds:
            overrides = {"data.side_fields.cluster_labels": labels_path(workdir, row.k, row.labels, topk[row.k]),
                         "mlcd.sample_rate": row.rate, "mlcd.margin": row.margin, "seed": seed}
            if centres == "kmeans":
                overrides["mlcd.init_centers"] = os.path.join(workdir, f"cluster_k{row.k}", CENTERS_FILE)
            if quick:
                overrides["data.synthetic_size"] = QUICK_RECORDS
            stages.append(Stage(f"{row.name}_s{seed}", train=student_spec(row, steps, batch, quick), overrides=overrides))
    return stages


def write_label_subsets(workdir: str, rows: Sequence[Row], topk: dict[int, int]) -> None:
    """The first l columns of each clustering's top-l labels, for the rows with fewer labels."""
    import numpy as np

    from clus_jax.common.files import atomic_save_npy
    from clus_jax.data.side_fields import SideFieldReader

    for row in rows:
        path = labels_path(workdir, row.k, row.labels, topk[row.k])
        if row.labels < topk[row.k] and not os.path.exists(path):
            full = SideFieldReader(labels_path(workdir, row.k, topk[row.k], topk[row.k]), "cluster_labels").array()
            atomic_save_npy(path, np.ascontiguousarray(full[:, :row.labels]))


def sampling(workdir: str, row: Row, topk: int, batch: int, devices: int, draws: int = 200) -> dict[str, float]:
    """What Partial-FC scores per step for ``row``: distinct positives of a random batch (mean over ``draws``
    batches of the row's labels), centres scored, negatives kept and negatives in all."""
    import numpy as np

    from clus_jax.data.side_fields import SideFieldReader
    from clus_jax.objectives.partial_fc import padded_rows, samples_per_shard

    labels = SideFieldReader(labels_path(workdir, row.k, topk, topk), "cluster_labels").array()[:, :row.labels]
    rng = np.random.default_rng(0)
    distinct = [len(np.unique(labels[rng.choice(len(labels), min(batch, len(labels)), replace=False)]))
                for _ in range(draws)]
    positives = float(np.mean(distinct))
    rows = padded_rows(row.k, 256)
    per_device = rows // devices
    scored = row.k if row.rate >= 1.0 else min(row.k, devices * samples_per_shard(per_device, row.rate))
    return dict(distinct_positives=round(positives, 1), centres_scored=scored,
                negatives_kept=round(max(scored - positives, 0.0), 1), negatives_all=round(row.k - positives, 1))


def _final(workdir: str, steps: int) -> dict[str, Any] | None:
    from clus_jax.sweep import read_final_metrics

    metrics, step = read_final_metrics(workdir)
    return metrics if step is not None and step >= steps else None


def _seconds(workdir: str) -> float | None:
    path = os.path.join(workdir, recipe.DONE_FILE)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f).get("seconds")


def _mean_std(values: Sequence[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def row_record(workdir: str, row: Row, seeds: Sequence[int], steps: int, batch: int) -> dict[str, Any]:
    """The row's figures over its finished seeds: mean, sample std, min, max and the per-seed values."""
    finished = {s: m for s in seeds if (m := _final(os.path.join(workdir, f"{row.name}_s{s}"), steps)) is not None}
    record: dict[str, Any] = dict(row=row.name, k=row.k, labels=row.labels, rate=row.rate, margin=row.margin,
                                  steps=steps, batch=batch, seeds=sorted(finished))
    for key, short in ((PROBE, "linear"), (KNN, "knn"), ("train/loss", "loss")):
        values = [float(m[key]) for m in finished.values() if key in m]
        record[short], record[f"{short}_std"] = _mean_std(values)
        record[f"{short}_min"], record[f"{short}_max"] = (min(values), max(values)) if values else (None, None)
        record[f"{short}_per_seed"] = values
    seconds = [t for s in finished if (t := _seconds(os.path.join(workdir, f"{row.name}_s{s}"))) is not None]
    record["seconds_per_run"] = _mean_std(seconds)[0]
    return record


def teacher_record(teacher: str) -> dict[str, Any]:
    """The teacher's path and, for a run, its own final probe and k-NN and the seconds its stage took."""
    metrics = _final(teacher, 0) or {}
    return dict(teacher=teacher, linear=metrics.get(PROBE), knn=metrics.get(KNN), seconds=_seconds(teacher))


def _fmt(mean: float | None, std: float | None) -> str:
    return "" if mean is None else f"{mean:.3f} ± {std:.3f}"


def print_table(records: Sequence[dict[str, Any]]) -> None:
    rows = [dict({k: v for k, v in r.items() if v is not None}, linear_pm=_fmt(r["linear"], r["linear_std"]),
                 knn_pm=_fmt(r["knn"], r["knn_std"]), n=len(r["seeds"])) for r in records]
    common.print_table(rows, [("row", "row", ""), ("k", "K", "d"), ("labels", "l", "d"), ("rate", "r", ".1f"),
                              ("margin", "m", ".1f"), ("distinct_positives", "positives/step", ".1f"),
                              ("centres_scored", "centres scored", "d"), ("negatives_kept", "negatives kept", ".1f"),
                              ("negatives_all", "of negatives", ".1f"), ("n", "seeds", "d"),
                              ("linear_pm", "linear probe", ""), ("knn_pm", "k-NN", ""),
                              ("seconds_per_run", "s/run", ".0f")])


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default=None,
                   help="where the embedding, clusterings and runs go (default /tmp/clus_jax/mlcd_ablation; "
                        "--quick: a temporary folder)")
    p.add_argument("--teacher", default=None, help="a finished run or an open_clip checkpoint folder to embed with "
                                                   "(default: configs/clip.py, trained once into the cache folder)")
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 of every row")
    p.add_argument("--steps", type=int, default=200, help="MLCD steps of every run")
    p.add_argument("--batch", type=int, default=128, help="global batch of every run")
    p.add_argument("--centres", choices=("kmeans", "random"), default="kmeans",
                   help="the classifier's start: the k-means centres (the recipe's) or unicom's N(0, 0.01)")
    p.add_argument("--collect", action="store_true", help="only print the table of the finished runs")
    p.add_argument("--quick", action="store_true", help="a tiny version end to end: 2 steps of 16, one seed")
    args = p.parse_args(argv)
    if min(args.seeds, args.steps, args.batch) < 1:
        p.error("--seeds, --steps and --batch must be at least 1")
    if args.quick:
        args.seeds, args.steps, args.batch = 1, 2, 16
    with contextlib.ExitStack() as stack:
        if args.workdir is None:
            args.workdir = (stack.enter_context(tempfile.TemporaryDirectory(prefix="mlcd_ablation_")) if args.quick
                            else os.path.join("/tmp", "clus_jax", "mlcd_ablation"))
        return _run(p, args)


def _run(p: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from clus_jax.config.base import load_config, load_config_module

    workdir = os.path.abspath(args.workdir)
    os.chdir(common.REPO_ROOT)  # the stages name configs/... relative to the repository
    rows = QUICK_ROWS if args.quick else ROWS
    stage = None
    if args.teacher:
        teacher = os.path.abspath(args.teacher)
        try:
            width = load_config_module("configs/mlcd.py").teacher_width(teacher)
        except ValueError as e:
            p.error(f"--teacher: {e}")
    else:
        from clus_jax.common.cache import cache_dir

        root = workdir if args.quick else str(cache_dir() / "bench" / "mlcd_ablation")
        (stage,) = recipe.resolve([teacher_stage(args.quick)], root)
        teacher, width = stage.workdir, int(load_config(stage.train).model.embed_dim)
    student_width = int(load_config(student_spec(rows[0], args.steps, args.batch, args.quick)).model.embed_dim)
    if args.centres == "kmeans" and width != student_width:
        p.error(f"--centres kmeans: the teacher embeds in {width}, the student in {student_width}; "
                "pass --centres random")
    host_record = host.describe()
    print("host:", host.summary(host_record), flush=True)
    host_fields = dict(host=host_record["model"], ids=host_record["ids"], cores=host_record["cores"],
                       xla_matmul_gflops=host_record["xla_matmul_gflops"], load_average=common.load_average())
    if stage is not None and not args.collect and recipe.run_recipe([stage]) != 0:
        return 1
    offline, topk = offline_stages(teacher, rows, args.quick)
    trains = train_stages(workdir, rows, topk, range(args.seeds), args.steps, args.batch, args.centres, args.quick)
    failed = 0
    if not args.collect:
        failed = recipe.run_recipe(recipe.resolve(offline, workdir))
        if not failed:
            write_label_subsets(workdir, rows, topk)
            failed = recipe.run_recipe(recipe.resolve(trains, workdir))
    import jax

    records = []
    for row in rows:
        record = row_record(workdir, row, range(args.seeds), args.steps, args.batch)
        if os.path.exists(labels_path(workdir, row.k, topk[row.k], topk[row.k])):
            record.update(sampling(workdir, row, topk[row.k], args.batch, jax.device_count()))
        records.append(record)
    print(f"MLCD stage alone, {args.steps} steps of batch {args.batch} per run, centres from {args.centres}; "
          f"teacher {teacher}; easy-VQA linear probe and k-NN of the image tower (chance 0.042), "
          f"mean ± sample std over seeds", flush=True)
    print_table(records)
    common.emit(dict(bench="mlcd_ablation/teacher", **teacher_record(teacher), **host_fields))
    for record in records:
        common.emit(dict(bench="mlcd_ablation", teacher=teacher, centres=args.centres, **record, **host_fields))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
