"""python -m clus_jax.cluster: k-means of an embedding directory on the device mesh, with labels for training.

    python -m clus_jax.cluster --features DIR --k K --out OUT [--field image_emb] [--metric euclidean|cosine]
        [--iters N] [--tol T] [--init random|kmeans++] [--seed S] [--balanced] [--levels M,N [--balanced-coarse]]
        [--topk L --assign-to SIDE_DIR] [--labels PATH] [--mesh data=-1,tensor=1] [--checkpoint-every SECONDS]

``--features`` is the output of ``python -m clus_jax.embed`` (``--field`` picks ``image_emb`` or
``text_emb`` when it holds both); records that could not be embedded (``valid`` False) are left out of
the clustering. ``--levels M,N`` is MoDE's hierarchy: M fine centres, then the fine centres clustered into
N coarse ones (``--k``, if given, must be M); ``--balanced-coarse`` makes that second level balanced k-means
(MoDE's: M / N fine centres per coarse one, so with ``--balanced`` every coarse cluster holds the same number
of points). ``--topk L --assign-to SIDE_DIR`` labels every record with
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

Output, in ``OUT`` (``clustering/outputs.py`` lists the files): ``centers.npy``, ``assignments.npy`` (per
record, -1 where a record has no embedding), ``sizes.npy``, with ``--levels`` ``coarse_centers.npy``,
``fine_to_coarse.npy`` and ``coarse_assignments.npy``; ``outputs.json`` (what each file holds),
``cluster_sizes.png``, ``cluster.json`` (the arguments) and ``summary.json``: the figures, also printed on
stdout as one JSON line: iterations, inertia (mean squared euclidean distance of a point to its centre; unit
centres for cosine), size imbalance and empty fraction (clustering/quality.py), NMI/ARI/purity with --labels.
``checkpoint/`` holds the k-means state, so a re-run after an interruption resumes from it.

A progress line (iteration, pass progress, running inertia, ETA) goes to stderr. A re-run of a finished
clustering prints its summary and does nothing; one with other arguments into the same ``OUT`` is refused.
Every input (each shard of ``--features``, ``--labels``) is opened and checked before anything is computed
or written, so a mistake leaves ``OUT`` as it was and a re-run with the input corrected starts afresh. A
mistyped command exits with one ``error: ...`` line (code 2), an unusable input with one such line and
code 1.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
from etils import epath

from clus_jax.common import cli
from clus_jax.common.files import claim_directory

METRICS = ("euclidean", "cosine")
INITS = ("random", "kmeans++")


def _levels(text: str) -> tuple[int, int]:
    parts = text.split(",")
    if len(parts) != 2 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"--levels expects M,N (fine, coarse), two positive integers, got {text!r}")
    return int(parts[0]), int(parts[1])


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The arguments, checked; a mistyped or inconsistent command exits 2 with one line naming the flag."""
    p = cli.ArgumentParser(prog="python -m clus_jax.cluster", allow_abbrev=False,
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
    p.add_argument("--balanced-coarse", action="store_true",
                   help="with --levels M,N: balanced coarse level (M/N fine centres per coarse centre)")
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
        if args.balanced_coarse and args.levels[0] % args.levels[1]:
            cli.fail(f"--balanced-coarse needs the {args.levels[0]} fine centres of --levels to divide into "
                     f"{args.levels[1]} equal groups")
    elif args.balanced_coarse:
        cli.fail("--balanced-coarse goes with --levels M,N")
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
        from clus_jax.parallel.mesh import parse_mesh

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
    if args.balanced_coarse:  # only when set: an output written before the flag existed keeps its spec
        spec["balanced_coarse"] = True
    return spec


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


def check_inputs(args: argparse.Namespace) -> tuple[Any, np.ndarray, np.ndarray | None]:
    """(the embedding shards, each row's record index, each row's class with --labels): every input opened and
    checked before anything is written or computed, so a mistake costs no clustering and leaves ``--out`` as
    it was. Raises ``cli.UsageError`` (exit 2) or ``cli.InputError`` (exit 1) naming the flag."""
    from clus_jax import clustering
    from clus_jax.clustering import figures

    cli.check_out_dir("--out", args.out)
    if args.assign_to:
        cli.check_out_dir("--assign-to", args.assign_to)
    try:
        shards = clustering.EmbeddingShards(args.features, field=args.field)
    except (FileNotFoundError, ValueError) as e:
        raise cli.InputError(f"--features {args.features}: {cli.exception_text(e)}") from None
    if args.k > shards.num_rows:
        raise cli.UsageError(f"--k={args.k} exceeds the {shards.num_rows} embedded points of {args.features}")
    if args.balanced and shards.num_rows % args.k:
        raise cli.UsageError(f"--balanced needs the {shards.num_rows} points to divide into --k={args.k} equal clusters")
    records = shards.record_indices()
    if args.topk and np.any(np.diff(records) <= 0):
        raise cli.InputError(f"--features {args.features}: record indices are not increasing; the --topk labels "
                             f"could not be keyed by record index")
    truth = None
    if args.labels:
        try:
            truth = figures.read_labels(args.labels, records)
        except ValueError as e:
            raise cli.InputError(f"--labels {cli.exception_text(e)}") from None
    return shards, records, truth


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Clusters ``args.features`` into ``args.out``; returns the summary."""
    import jax

    from clus_jax import clustering
    from clus_jax.clustering import figures, outputs
    from clus_jax.clustering.topk_labels import write_topk_side_file
    from clus_jax.data.side_fields import CENTERS_FILE, COARSE_CENTERS_FILE, FINE_TO_COARSE_FILE
    from clus_jax.parallel import mesh as mesh_lib

    shards, records, truth = check_inputs(args)
    num_records = shards.num_records
    try:
        mesh = mesh_lib.create_mesh(args.mesh)
    except mesh_lib.MeshError as e:
        raise cli.UsageError(f"--mesh: {e}") from None
    writer = jax.process_index() == 0
    out = epath.Path(args.out)
    if writer:  # the spec only now: a run that stopped at a bad input leaves nothing a re-run would trust
        out.mkdir(parents=True, exist_ok=True)
        claim_directory(out, outputs.SPEC_FILE, _spec(args), "another clustering")
    finished = outputs.read_summary(out)
    if finished is not None:
        print(f"cluster: {os.fspath(out)} is complete, nothing to do", file=sys.stderr, flush=True)
        return finished

    start = time.time()
    checkpoint = out / outputs.CHECKPOINT_DIR
    resumed = checkpoint.exists() and any(checkpoint.iterdir())
    if resumed:
        print(f"cluster: resuming from {os.fspath(checkpoint)}", file=sys.stderr, flush=True)
    progress = Progress(args.iters, resumed=resumed)
    if args.levels:
        m, n = args.levels
        tree = clustering.two_level(shards, m, n, balanced=args.balanced, metric=args.metric, num_iters=args.iters,
                                    init=args.init, seed=args.seed, mesh=mesh, checkpoint_dir=os.fspath(checkpoint),
                                    progress=progress, balanced_coarse=args.balanced_coarse)
        centers, assignments, iterations = tree.fine_centers, tree.fine_assignments, args.iters
    else:
        options = {k: v for k, v in (("chunk_rows", args.chunk_rows), ("checkpoint_every_s", args.checkpoint_every))
                   if v is not None}
        result = clustering.kmeans(shards, args.k, num_iters=args.iters, metric=args.metric, init=args.init,
                                   seed=args.seed, mesh=mesh, tol=args.tol, balanced=args.balanced,
                                   checkpoint_dir=os.fspath(checkpoint), progress=progress, **options)
        centers, assignments, iterations = result.centers, result.assignments, int(result.num_iters_run)
    centers, assignments = np.asarray(centers, np.float32), np.asarray(assignments, np.int32)
    sizes, size_figures = figures.size_figures(assignments, args.k)
    arrays: dict[str, tuple[np.ndarray, str]] = {
        CENTERS_FILE: (centers, "centres [K, D]" + (" (fine)" if args.levels else "")),
        outputs.ASSIGNMENTS_FILE: (outputs.by_record(assignments, records, num_records),
                                   "nearest centre of each record, -1 where the record has no embedding"),
        outputs.SIZES_FILE: (sizes, "points per centre"),
    }
    summary: dict[str, Any] = {
        "out": os.fspath(out), "features": args.features, "field": shards.field, "points": shards.num_rows,
        "records": num_records, "dim": shards.dim, "k": args.k, "metric": args.metric, "balanced": args.balanced,
        "mesh": {axis: int(size) for axis, size in mesh.shape.items()}, "processes": jax.process_count(),
        "iterations": iterations, "inertia": figures.streamed_inertia(shards, centers, assignments),
        "sizes": size_figures}
    coarse_sizes = None
    if args.levels:
        fine_to_coarse = np.asarray(tree.fine_to_coarse, np.int32)
        coarse_of_point = fine_to_coarse[assignments]
        coarse_sizes, coarse_figures = figures.size_figures(coarse_of_point, n)
        arrays[COARSE_CENTERS_FILE] = (np.asarray(tree.coarse_centers, np.float32), "coarse centres [N, D]")
        arrays[FINE_TO_COARSE_FILE] = (fine_to_coarse, "coarse centre of each fine centre")
        arrays[outputs.COARSE_ASSIGNMENTS_FILE] = (outputs.by_record(coarse_of_point, records, num_records),
                                                   "coarse centre of each record, -1 where the record has no embedding")
        summary["levels"] = {"fine": m, "coarse": n, "balanced_coarse": args.balanced_coarse,
                             "coarse_sizes": coarse_figures}
    if truth is not None:
        summary["labels"] = figures.label_figures(truth, assignments)
    if args.topk:
        summary["topk"] = write_topk_side_file(shards, centers, args.topk, args.metric, args.assign_to, num_records,
                                               mesh=mesh, write=writer)
    summary["seconds"] = round(time.time() - start, 2)
    if writer:
        title = (f"{args.k} clusters of {shards.num_rows} points ({args.metric}); imbalance "
                 f"{summary['sizes']['imbalance']:.2f}, empty {summary['sizes']['fraction_empty']:.1%}")
        outputs.write(out, arrays, summary, figures.sizes_png(sizes, title, coarse_sizes), side_file=args.assign_to)
    return summary


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    from clus_jax.parallel.distributed import maybe_initialize

    maybe_initialize()
    cli.run_command(lambda: run(args), print_json=True)


if __name__ == "__main__":
    main()
