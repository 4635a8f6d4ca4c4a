"""Balanced k-means at scale: seconds per iteration, peak memory and the auction's work, on one process.

Every iteration assigns exactly N / K points to each centre (``clustering.balanced_assign_points``: each
point's best centres searched on the device mesh, the auction on the host) and moves the centres to their
clusters' means. Points are Gaussian blobs (bench/kmeans.py's: K/4 blob centres), K distinct points as the
initial centres. Prints, per iteration, the seconds (an update and an assignment), the mean squared distance and how many points the auction
searched again (on the host, one at a time, and on the mesh, in batches); then one summary record with the
peak RSS (``ru_maxrss``), the host (processor model, measured float32 matmul rate) and the load average.

    python bench/balanced_kmeans.py                          # 1,000,448 x 384 -> 1,024 (977 points each), 3 iterations
    python bench/balanced_kmeans.py --n 262144 --d 128 --k 512 --iters 5
    python bench/balanced_kmeans.py --quick                  # 16,384 x 32 -> 64, 2 iterations

N must divide by K: 1,000,448 = 977 x 1,024 is the million. The points alone are N x D x 4 bytes (1.5 GiB at the
default); the auction holds [N, candidates] centre ids and float64 benefits (0.6 GiB at 48 candidates).
"""
from __future__ import annotations

import argparse
import os
import resource
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (puts the repository on sys.path)
import host  # noqa: E402
from kmeans import blobs  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=1_000_448)
    p.add_argument("--d", type=int, default=384)
    p.add_argument("--k", type=int, default=1024)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--candidates", type=int, default=None, help="centres listed per point (default: the library's)")
    p.add_argument("--quick", action="store_true", help="16,384 x 32 -> 64, 2 iterations")
    args = p.parse_args(argv)
    if args.quick:
        args.n, args.d, args.k, args.iters = 16_384, 32, 64, 2
    if args.n % args.k:
        p.error(f"--n {args.n} must divide by --k {args.k} (equal clusters)")
    return args


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv=None) -> int:
    args = parse_args(argv)
    import numpy as np

    from clus_jax.clustering import balanced

    gflops = host.xla_matmul_gflops()
    x, init = blobs(args.n, args.d, args.k)
    print(f"balanced k-means {args.n} x {args.d} -> {args.k} ({args.n // args.k} points each), {args.iters} "
          f"iterations; points {x.nbytes / 2**30:.2f} GiB; {host.summary(host.describe(gflops))}", flush=True)
    kw = {} if args.candidates is None else {"candidates": args.candidates}
    balanced.balanced_assign_points(x[:4 * args.k], init, **kw)  # compiles the search and the auction
    stats, marks = [], [time.perf_counter()]

    def progress(iteration, fraction, inertia):
        marks.append(time.perf_counter())
        record = {"bench": "balanced_kmeans/iteration", "iteration": iteration,
                  "seconds": round(marks[-1] - marks[-2], 2), "inertia": round(inertia, 4), **stats[-1]}
        common.emit(record)

    marks[0] = start = time.perf_counter()
    result = balanced.balanced_kmeans(x, args.k, num_iters=args.iters, metric="euclidean", init=init,
                                      progress=progress, assign_stats=stats, **kw)
    end = time.perf_counter()
    total = end - start
    sizes = np.bincount(result.assignments, minlength=args.k)
    assert sizes.min() == sizes.max() == args.n // args.k, (sizes.min(), sizes.max())
    per_iter = [b - a for a, b in zip(marks[:-1], marks[1:])]
    summary = {"bench": "balanced_kmeans", "n": args.n, "d": args.d, "k": args.k, "iterations": args.iters,
               "seconds": round(total, 1), "seconds_per_iteration": round(sum(per_iter) / len(per_iter), 1),
               "final_assignment_seconds": round(end - marks[-1], 1),
               "inertia": round(result.inertia, 4), "cluster_size": int(sizes[0]),
               "peak_rss_mib": round(peak_rss_mib(), 1), "load_average": common.load_average(),
               **host.describe(gflops)}
    common.emit(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
