"""python -m clus_jax.cluster: k-means of an embedding directory on the device mesh, with labels for training.

    python -m clus_jax.cluster --features DIR --k K --out OUT [--field image_emb] [--metric euclidean|cosine]
        [--iters N] [--tol T] [--init random|kmeans++] [--seed S] [--balanced] [--levels M,N]
        [--topk L --assign-to SIDE_DIR] [--labels PATH] [--mesh data=-1,tensor=1] [--checkpoint-every SECONDS]

``--features`` is the output of ``python -m clus_jax.embed`` (``--field`` picks ``image_emb`` or
``text_emb`` when it holds both); records that could not be embedded (``valid`` False) are left out of
the clustering. ``--levels M,N`` is MoDE's hierarchy: M fine centres, then the fine centres clustered into
N coarse ones (``--k``, if given, must be M). ``--topk L --assign-to SIDE_DIR`` labels every record with
its L nearest (fine) centres, nearest first, written as a side file keyed by record index
(``clus_jax/data/side_fields.py``) with the fields ``cluster_labels`` int32 [L] and ``cluster_sims``
float32 [L] (similarity: dot product with unit centres for cosine, minus the squared distance for
euclidean); a record that has no embedding gets labels -1 and similarities 0. The training pipeline joins
it with ``--config.data.side_fields.cluster_labels=SIDE_DIR`` for an objective that declares
``cluster_labels`` as a batch field. ``--labels PATH`` (a ``.npy`` or side file of one class per record)
adds NMI, adjusted Rand index and purity to the summary.

The mesh is the trainer's (``--mesh``, axes ``data``, ``fsdp``, ``tensor``): points are split over the data
axes and centres over ``tensor``, and a multi-process job starts like the trainer (``jax.distributed`` from
the environment; ``MODULE=clus_jax.cluster`` with the ``launch/`` scripts). Only process 0 writes.

Output, in ``OUT``::

    manifest.json          what every file holds (shape, dtype, meaning) and the arguments
    centers.npy            float32 [K, D] (the fine centres with --levels)
    assignments.npy        int32 [num_records]: nearest centre of each record, -1 where it has no embedding
    sizes.npy              int64 [K] points per centre
    coarse_centers.npy, fine_to_coarse.npy, coarse_assignments.npy   with --levels
    summary.json           the figures (also printed on stdout as one JSON line): iterations, inertia (mean
                           squared euclidean distance of a point to its centre; unit centres for cosine), size
                           imbalance and empty fraction (clustering/quality.py), NMI/ARI/purity with --labels
    cluster_sizes.png      the cluster-size distribution
    checkpoint/            orbax k-means state: a re-run after an interruption resumes from it

A progress line (iteration, pass progress, running inertia, ETA) goes to stderr. A re-run of a finished
clustering prints its summary and does nothing; one with other arguments into the same ``OUT`` is refused.
A mistyped command exits with one ``error: ...`` line (code 2), an unusable input with one such line and
code 1.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
from etils import epath

from clus_jax.common import cli

METRICS = ("euclidean", "cosine")
INITS = ("random", "kmeans++")
SPEC_FILE = "cluster.json"
SUMMARY_FILE = "summary.json"
MANIFEST = "manifest.json"
PLOT_FILE = "cluster_sizes.png"
CHECKPOINT_DIR = "checkpoint"
LABELS_FIELD = "cluster_labels"
SIMS_FIELD = "cluster_sims"


class InputError(RuntimeError):
    """An input that cannot be used (no embedding directory, unreadable labels); exit code 1."""


class _ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not argparse's usage block
        cli.fail(message)


def _levels(text: str) -> tuple[int, int]:
    parts = text.split(",")
    if len(parts) != 2 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"--levels expects M,N (fine, coarse), two positive integers, got {text!r}")
    return int(parts[0]), int(parts[1])


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The arguments, checked; a mistyped or inconsistent command exits 2 with one line naming the flag."""
    p = _ArgumentParser(prog="python -m clus_jax.cluster", allow_abbrev=False,
                        description="k-means of an embedding directory on the device mesh.")
    p.add_argument("--features", required=True, help="embedding directory (python -m clus_jax.embed --out)")
    p.add_argument("--field", default=None, help="embedding field to cluster (image_emb, text_emb)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--k", type=int, default=None, help="number of centres")
    p.add_argument("--levels", type=_levels, default=None, help="M,N: M fine centres clustered into N coarse ones")
    p.add_argument("--metric", choices=METRICS, default="euclidean")
    p.add_argument("--iters", type=int, default=20, help="Lloyd iterations (passes over the points)")
    p.add_argument("--tol", type=float, default=None, help="stop early when inertia improves by less than this ratio")
    p.add_argument("--init", choices=INITS, default="random")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--balanced", action="store_true", help="equal-size clusters (exactly N/K points each)")
    p.add_argument("--topk", type=int, default=None, help="label every record with its L nearest centres")
    p.add_argument("--assign-to", default=None, help="side-file directory for the --topk labels")
    p.add_argument("--labels", default=None, help="class of every record (.npy or side file) for NMI/ARI/purity")
    p.add_argument("--mesh", default="data=-1", help="device mesh, e.g. data=2,tensor=4 (centres over tensor)")
    p.add_argument("--chunk-rows", type=int, default=None, help="points per k-means step (single level)")
    p.add_argument("--checkpoint-every", type=float, default=None,
                   help="seconds between checkpoints within a pass (single level; default 60)")
    args = p.parse_args(argv)
    if args.levels is not None:
        if args.k is not None and args.k != args.levels[0]:
            cli.fail(f"--k={args.k} and --levels={args.levels[0]},{args.levels[1]} disagree: --k is the fine count M")
        args.k = args.levels[0]
        if args.levels[1] > args.levels[0]:
            cli.fail(f"--levels={args.levels[0]},{args.levels[1]}: the coarse count must not exceed the fine count")
    if args.k is None:
        cli.fail("give --k K (or --levels M,N)")
    if args.levels is not None:
        given = [f for f, v in (("--tol", args.tol), ("--chunk-rows", args.chunk_rows),
                                ("--checkpoint-every", args.checkpoint_every)) if v is not None]
        if given:
            cli.fail(f"{', '.join(given)} apply to single-level clustering, not with --levels")
    if args.chunk_rows is not None and args.chunk_rows < 1:
        cli.fail(f"--chunk-rows={args.chunk_rows} must be at least 1")
    if args.k < 1:
        cli.fail(f"--k={args.k} must be at least 1")
    if args.iters < 0:
        cli.fail(f"--iters={args.iters} must be at least 0")
    if (args.topk is None) != (args.assign_to is None):
        cli.fail("--topk L and --assign-to DIR go together")
    if args.topk is not None and not 1 <= args.topk <= args.k:
        cli.fail(f"--topk={args.topk} must be in [1, --k={args.k}]")
    try:
        from clus_jax.plan import parse_mesh

        args.mesh = parse_mesh(args.mesh)
    except ValueError as e:
        cli.fail(str(e))
    return args


def _spec(args: argparse.Namespace) -> dict[str, Any]:
    """The arguments that decide the result (what a re-run into the same OUT must repeat)."""
    keys = ("features", "field", "k", "levels", "metric", "iters", "tol", "init", "seed", "balanced", "topk",
            "assign_to", "labels")
    spec = {k: getattr(args, k) for k in keys}
    spec["features"] = os.path.abspath(args.features) if "://" not in args.features else args.features
    return json.loads(json.dumps(spec))


def _write_bytes(path: epath.Path, data: bytes) -> None:
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    tmp.write_bytes(data)
    tmp.replace(path)


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array))
    return buf.getvalue()


def _check_spec(out: epath.Path, spec: dict[str, Any]) -> None:
    path = out / SPEC_FILE
    if path.exists():
        old = json.loads(path.read_text())
        differ = sorted(k for k in set(spec) | set(old) if old.get(k) != spec.get(k))
        if differ:
            raise cli.UsageError(f"--out {os.fspath(out)} holds another clustering (different {', '.join(differ)} "
                                 f"in {SPEC_FILE}); pass another --out")
        return
    _write_bytes(path, json.dumps(spec, indent=1).encode())


class Progress:
    """The k-means progress callback: 'cluster: iteration i/n  pass p%  inertia x  eta h:mm:ss' on stderr,
    at most every ``every`` seconds and at the end of every pass. ``resumed``: say where the pass began.
    (``CLUS_JAX_FAULT=after_iteration:N`` kills the process as pass N begins, for the resume tests.)"""

    def __init__(self, num_iters: int, *, resumed: bool = False, every: float = 5.0):
        self.num_iters, self.resumed, self.every = max(num_iters, 1), resumed, every
        self.t0, self.last, self.start = time.time(), 0.0, None

    def __call__(self, iteration: int, pass_fraction: float, inertia: float) -> None:
        from clus_jax.common import faults

        faults.maybe_inject("after_iteration", iteration)
        done = iteration + pass_fraction
        if self.start is None:  # where this process began (after a resume, not 0)
            self.start, self.t0 = done, time.time()
            if self.resumed:
                print(f"cluster: resumed at iteration {iteration + 1}/{self.num_iters}, pass {100 * pass_fraction:.0f}%",
                      file=sys.stderr, flush=True)
        now = time.time()
        if pass_fraction < 1.0 and now - self.last < self.every:
            return
        self.last = now
        rate = (done - self.start) / max(now - self.t0, 1e-9)
        eta = (self.num_iters - done) / rate if rate > 0 else 0.0
        print(f"cluster: iteration {iteration + 1}/{self.num_iters}  pass {100 * pass_fraction:.0f}%  "
              f"inertia {inertia:.6g}  eta {cli.format_eta(eta)}", file=sys.stderr, flush=True)


def _sizes_figure(sizes: np.ndarray, title: str, coarse: np.ndarray | None = None) -> bytes:
    """PNG of the cluster-size distribution: sizes by rank (log scale, mean marked) and their histogram."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt
    from matplotlib.ticker import MaxNLocator

    panels = 3 if coarse is not None else 2
    fig, axes = plt.subplots(1, panels, figsize=(4.2 * panels, 3.4))
    ranked = np.sort(sizes)[::-1]
    axes[0].plot(np.arange(1, len(ranked) + 1), np.maximum(ranked, 0.5), drawstyle="steps-mid")
    axes[0].axhline(sizes.mean(), color="grey", linestyle="--", label=f"mean {sizes.mean():.3g}")
    axes[0].set(xlabel="cluster rank", ylabel="points", yscale="log", title="sizes by rank")
    axes[0].legend(fontsize=8)
    axes[1].hist(sizes, bins=min(50, max(len(np.unique(sizes)), 1)))
    axes[1].set(xlabel="points in a cluster", ylabel="clusters", title="size histogram")
    if coarse is not None:
        axes[2].bar(np.arange(len(coarse)), coarse)
        axes[2].set(xlabel="coarse cluster", ylabel="points", title="coarse sizes")
    for axis in (axes[0].xaxis, axes[1].yaxis, *((axes[2].xaxis,) if coarse is not None else ())):
        axis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def _size_figures(assignments: np.ndarray, k: int) -> tuple[np.ndarray, dict[str, Any]]:
    """(points per cluster, the summary's size figures: min, max, mean, imbalance, empty fraction)."""
    from clus_jax.clustering import quality

    stats = quality.cluster_sizes(assignments, k)
    sizes = stats.counts
    return sizes, {"min": int(sizes.min()), "max": int(sizes.max()), "mean": float(sizes.mean()),
                   "imbalance": stats.imbalance, "fraction_empty": stats.fraction_empty}


def _by_record(values: np.ndarray, records: np.ndarray, num_records: int, fill: int = -1) -> np.ndarray:
    out = np.full((num_records, *values.shape[1:]), fill, values.dtype)
    out[records] = values
    return out


def _label_figures(path: str, records: np.ndarray, assignments: np.ndarray) -> dict[str, float]:
    from clus_jax.clustering import quality
    from clus_jax.data.side_fields import SideFieldReader

    try:
        reader = SideFieldReader(path, field="labels")
    except (FileNotFoundError, ValueError) as e:
        raise InputError(f"--labels {path}: {cli.exception_text(e)}") from None
    labels = np.concatenate(list(reader.chunks())).reshape(len(reader), -1)[:, 0]
    if len(labels) <= records.max(initial=0):
        raise InputError(f"--labels {path} has {len(labels)} rows but the embeddings reach record {records.max()}")
    truth = labels[records]
    return {"nmi": quality.nmi(truth, assignments), "adjusted_rand_index": quality.adjusted_rand_index(truth, assignments),
            "purity": quality.purity(truth, assignments)}


def streamed_inertia(shards: Any, centers: np.ndarray, assignments: np.ndarray) -> float:
    """``quality.inertia`` (mean squared distance to the assigned centre) over the shards, one at a time."""
    from clus_jax.clustering import quality

    total, row = 0.0, 0
    for chunk in shards:
        total += quality.inertia(chunk, centers, assignments[row:row + len(chunk)]) * len(chunk)
        row += len(chunk)
    return total / max(row, 1)


def write_topk_side_file(shards: Any, centers: np.ndarray, l: int, metric: str, path: str, num_records: int, *,
                         mesh: Any = None, write: bool = True) -> dict[str, Any]:
    """The ``l`` nearest centres of every record as a side file keyed by record index, one shard at a time.

    Records with no embedding get labels -1 and similarities 0. Returns a small summary.
    """
    from clus_jax.clustering import assign_topk
    from clus_jax.data.fields import FieldSpec
    from clus_jax.data.side_fields import INDEX_FIELD, SideFileWriter

    specs = {LABELS_FIELD: FieldSpec((l,), "int32"), SIMS_FIELD: FieldSpec((l,), "float32"),
             INDEX_FIELD: FieldSpec((), "int64")}
    records = shards.record_indices()
    writer = SideFileWriter(path, specs, overwrite=True) if write else None
    position, row, labelled = 0, 0, 0

    def fill(upto: int) -> None:  # rows of records [position, upto) that have no embedding
        if writer is not None and upto > position:
            n = upto - position
            writer.write({LABELS_FIELD: np.full((n, l), -1, np.int32), SIMS_FIELD: np.zeros((n, l), np.float32),
                          INDEX_FIELD: np.arange(position, upto, dtype=np.int64)})

    for chunk in shards:
        ids, sims = assign_topk(chunk, centers, l, metric, mesh=mesh)
        index = records[row:row + len(chunk)]
        row += len(chunk)
        labelled += len(chunk)
        if writer is None:
            continue
        if len(index) and (index[0] < position or np.any(np.diff(index) <= 0)):
            raise InputError(f"--features {shards.directory}: record indices are not increasing; cannot key "
                                 f"labels by record index")
        end = int(index[-1]) + 1
        labels = np.full((end - position, l), -1, np.int32)
        scores = np.zeros((end - position, l), np.float32)
        labels[index - position], scores[index - position] = ids, sims
        writer.write({LABELS_FIELD: labels, SIMS_FIELD: scores, INDEX_FIELD: np.arange(position, end, dtype=np.int64)})
        position = end
    fill(num_records)
    if writer is not None:
        writer.close()
    return {"l": l, "side_file": path, "records": max(position, num_records), "labelled": labelled}


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Clusters ``args.features`` into ``args.out``; returns the summary."""
    import jax

    from clus_jax import clustering
    from clus_jax.data.side_fields import SideFieldReader
    from clus_jax.parallel import mesh as mesh_lib

    try:
        shards = clustering.EmbeddingShards(args.features, field=args.field)
        num_records = len(SideFieldReader(args.features, field=shards.field))
    except (FileNotFoundError, ValueError) as e:
        raise InputError(f"--features {args.features}: {cli.exception_text(e)}") from None
    if args.k > shards.num_rows:
        raise cli.UsageError(f"--k={args.k} exceeds the {shards.num_rows} embedded points of {args.features}")
    if args.balanced and shards.num_rows % args.k:
        raise cli.UsageError(f"--balanced needs the {shards.num_rows} points to divide into --k={args.k} equal clusters")
    try:
        mesh = mesh_lib.create_mesh(args.mesh)
    except mesh_lib.MeshError as e:
        raise cli.UsageError(f"--mesh: {e}") from None
    writer = jax.process_index() == 0
    out = epath.Path(args.out)
    spec = _spec(args)
    if writer:
        out.mkdir(parents=True, exist_ok=True)
        _check_spec(out, spec)
    if (out / SUMMARY_FILE).exists():
        print(f"cluster: {os.fspath(out)} is complete, nothing to do", file=sys.stderr, flush=True)
        return json.loads((out / SUMMARY_FILE).read_text())

    start = time.time()
    checkpoint = os.fspath(out / CHECKPOINT_DIR)
    resumed = (out / CHECKPOINT_DIR).exists() and any((out / CHECKPOINT_DIR).iterdir())
    if resumed:
        print(f"cluster: resuming from {checkpoint}", file=sys.stderr, flush=True)
    progress = Progress(args.iters, resumed=resumed)
    if args.levels:
        m, n = args.levels
        tree = clustering.two_level(shards, m, n, balanced=args.balanced, metric=args.metric, num_iters=args.iters,
                                    init=args.init, seed=args.seed, mesh=mesh, checkpoint_dir=checkpoint,
                                    progress=progress)
        centers, assignments, iterations = tree.fine_centers, tree.fine_assignments, args.iters
    else:
        options = {k: v for k, v in (("chunk_rows", args.chunk_rows), ("checkpoint_every_s", args.checkpoint_every))
                   if v is not None}
        result = clustering.kmeans(shards, args.k, num_iters=args.iters, metric=args.metric, init=args.init,
                                   seed=args.seed, mesh=mesh, tol=args.tol, balanced=args.balanced,
                                   checkpoint_dir=checkpoint, progress=progress, **options)
        centers, assignments, iterations = result.centers, result.assignments, int(result.num_iters_run)
    centers, assignments = np.asarray(centers, np.float32), np.asarray(assignments, np.int32)
    records = shards.record_indices()
    sizes, size_figures = _size_figures(assignments, args.k)
    files: dict[str, tuple[np.ndarray, str]] = {
        "centers": (centers, "centres [K, D]" + (" (fine)" if args.levels else "")),
        "assignments": (_by_record(assignments, records, num_records),
                        "nearest centre of each record, -1 where the record has no embedding"),
        "sizes": (sizes, "points per centre"),
    }
    summary: dict[str, Any] = {
        "out": os.fspath(out), "features": args.features, "field": shards.field, "points": shards.num_rows,
        "records": num_records, "dim": shards.dim, "k": args.k, "metric": args.metric, "balanced": args.balanced,
        "mesh": {axis: int(size) for axis, size in mesh.shape.items()}, "processes": jax.process_count(),
        "iterations": iterations, "inertia": streamed_inertia(shards, centers, assignments), "sizes": size_figures}
    coarse_sizes = None
    if args.levels:
        fine_to_coarse = np.asarray(tree.fine_to_coarse, np.int32)
        coarse_of_point = fine_to_coarse[assignments]
        coarse_sizes, coarse_figures = _size_figures(coarse_of_point, n)
        files["coarse_centers"] = (np.asarray(tree.coarse_centers, np.float32), "coarse centres [N, D]")
        files["fine_to_coarse"] = (fine_to_coarse, "coarse centre of each fine centre")
        files["coarse_assignments"] = (_by_record(coarse_of_point, records, num_records),
                                       "coarse centre of each record, -1 where the record has no embedding")
        summary["levels"] = {"fine": m, "coarse": n, "coarse_sizes": coarse_figures}
    if args.labels:
        summary["labels"] = _label_figures(args.labels, records, assignments)
    if args.topk:
        summary["topk"] = write_topk_side_file(shards, centers, args.topk, args.metric, args.assign_to,
                                               num_records, mesh=mesh, write=writer)
    summary["seconds"] = round(time.time() - start, 2)
    if not writer:
        return summary
    for name, (array, _) in files.items():
        _write_bytes(out / f"{name}.npy", _npy_bytes(array))
    title = (f"{args.k} clusters of {shards.num_rows} points ({args.metric}); imbalance "
             f"{summary['sizes']['imbalance']:.2f}, empty {summary['sizes']['fraction_empty']:.1%}")
    _write_bytes(out / PLOT_FILE, _sizes_figure(sizes, title, coarse_sizes))
    manifest = {"files": {f"{name}.npy": {"shape": list(a.shape), "dtype": str(a.dtype), "what": what}
                          for name, (a, what) in files.items()},
                "plot": PLOT_FILE, "summary": SUMMARY_FILE, "args": spec}
    if args.topk:
        manifest["side_file"] = {"path": args.assign_to, "fields": {LABELS_FIELD: [args.topk], SIMS_FIELD: [args.topk]}}
    _write_bytes(out / MANIFEST, json.dumps(manifest, indent=1).encode())
    _write_bytes(out / SUMMARY_FILE, json.dumps(summary, indent=1).encode())  # last: marks the clustering complete
    return summary


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    from clus_jax.parallel.distributed import maybe_initialize

    maybe_initialize()
    cli.run_and_print(lambda: run(args), input_errors=(InputError,))


if __name__ == "__main__":
    main()
