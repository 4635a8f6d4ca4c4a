"""Benchmark: jitted log-domain ``sinkhorn_knopp`` against a NumPy transcription of SwAV's algorithm.

Both run on the same float32 (B, K) cosine scores in the same process; the speedup is the ratio of the
two medians. With ``--devices N`` the script also times ``sharded_sinkhorn_knopp`` with rows sharded
over N devices (fake CPU devices when no accelerator is present), and over N/2 x 2 devices with the
prototype axis split in two.

Traffic model (bytes of the (B, K) matrix moved to or from memory, float32, fused elementwise work
counted once):

* JAX: one round is a per-prototype and a per-sample log-sum-exp, each a max pass and an exp-sum pass,
  so 4 reads = 16 B K bytes. Setup (read scores, write logits) and the final normalisation (read and
  write the codes) add 16 B K: total B K (16 + 16 n).
* NumPy: one round is two sums (1 read each) and two in-place divisions (read + write each), so
  24 B K bytes. Setup (divide, exp, total sum, divide) and the final ``* B`` add 36 B K: total
  B K (36 + 24 n).

Achieved GB/s is the total modelled traffic over the median time. On XLA:CPU a reduction over the
leading (batch) axis of a wide row-major matrix walks memory with a stride of K floats and runs far
below a row reduction, which is what limits the log-domain kernel at large K on CPU hosts.

  python bench/sinkhorn.py --quick
  python bench/sinkhorn.py --devices 8
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

FULL_SIZES = ((1024, 3000), (4096, 3000), (4096, 30000))
QUICK_SIZES = ((128, 100), (512, 1000))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes and few repeats, to check the script")
    parser.add_argument("--devices", type=int, default=1, help="also time the sharded version on this many devices")
    parser.add_argument("--epsilon", type=float, default=0.05)
    parser.add_argument("--num-iters", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per measurement (after one warm-up)")
    parser.add_argument("--dim", type=int, default=128, help="embedding width used to draw cosine scores")
    return parser.parse_args()


def swav_sinkhorn_numpy(out, epsilon: float, num_iters: int):
    """SwAV ``distributed_sinkhorn`` on one process, float32, with its in-place updates."""
    import numpy as np

    Q = np.exp(out / epsilon).T
    B = Q.shape[1]
    K = Q.shape[0]
    Q /= np.sum(Q)
    for _ in range(num_iters):
        Q /= np.sum(Q, axis=1, keepdims=True)
        Q /= K
        Q /= np.sum(Q, axis=0, keepdims=True)
        Q /= B
    Q *= B
    return Q.T


def median_seconds(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def cosine_scores(rng, batch: int, protos: int, dim: int):
    import numpy as np

    z = rng.standard_normal((batch, dim), dtype=np.float32)
    c = rng.standard_normal((protos, dim), dtype=np.float32)
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    return z @ c.T


def main() -> None:
    args = parse_args()
    if args.devices > 1:
        flags = os.environ.get("XLA_FLAGS", "")
        if "xla_force_host_platform_device_count" not in flags:
            os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={args.devices}".strip()

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from functools import partial

    import jax
    import numpy as np
    from jax.sharding import AxisType, NamedSharding
    from jax.sharding import PartitionSpec as P

    from clus_jax.objectives.sinkhorn import sharded_sinkhorn_knopp, sinkhorn_knopp

    sizes = QUICK_SIZES if args.quick else FULL_SIZES
    repeats = args.repeats or (3 if args.quick else 5)
    eps, n_iters = args.epsilon, args.num_iters
    devices = jax.devices()[: args.devices]
    if len(devices) < args.devices:
        raise SystemExit(f"asked for {args.devices} devices, found {len(jax.devices())}")
    print(f"jax {jax.__version__} on {devices[0].platform} x{len(devices)}, numpy {np.__version__}, "
          f"epsilon={eps}, num_iters={n_iters}, repeats={repeats} (median after 1 warm-up)")

    single = jax.jit(partial(sinkhorn_knopp, epsilon=eps, num_iters=n_iters))
    sharded_layouts = []
    if len(devices) > 1:
        auto = lambda shape, names: jax.sharding.Mesh(np.array(devices).reshape(shape), names,
                                                     axis_types=(AxisType.Auto,) * len(shape))
        sharded_layouts.append((f"jax-sharded data={len(devices)}", auto((len(devices),), ("data",)), "data", None))
        if len(devices) % 2 == 0:
            shape = (len(devices) // 2, 2)
            sharded_layouts.append((f"jax-sharded data={shape[0]} tensor=2", auto(shape, ("data", "tensor")),
                                    "data", "tensor"))

    rng = np.random.default_rng(0)
    header = f"{'impl':<30} {'B':>6} {'K':>6} {'median ms':>10} {'MB/iter':>9} {'GB/s':>7} {'vs numpy':>9} {'max|dq|':>9}"
    print(header)
    print("-" * len(header))
    records = []
    for batch, protos in sizes:
        scores = cosine_scores(rng, batch, protos, args.dim)
        elems = batch * protos
        reference = swav_sinkhorn_numpy(scores, eps, n_iters)
        t_numpy = median_seconds(lambda: swav_sinkhorn_numpy(scores, eps, n_iters), repeats)

        runs = [("numpy (SwAV, float32)", t_numpy, 24 * elems, elems * (36 + 24 * n_iters), reference)]
        x = jax.device_put(scores, devices[0])
        t = median_seconds(lambda: single(x).block_until_ready(), repeats)
        runs.append(("jax (jit, log-domain)", t, 16 * elems, elems * (16 + 16 * n_iters), single(x)))
        for name, mesh, batch_axes, proto_axis in sharded_layouts:
            if batch % mesh.shape[batch_axes] or (proto_axis and protos % mesh.shape[proto_axis]):
                continue
            spec = P(batch_axes, proto_axis)
            fn = jax.jit(partial(sharded_sinkhorn_knopp, mesh=mesh, batch_axes=batch_axes, proto_axis=proto_axis,
                                 epsilon=eps, num_iters=n_iters))
            xs = jax.device_put(scores, NamedSharding(mesh, spec))
            t = median_seconds(lambda: fn(xs).block_until_ready(), repeats)
            runs.append((name, t, 16 * elems, elems * (16 + 16 * n_iters), fn(xs)))

        for name, seconds, bytes_per_iter, total_bytes, codes in runs:
            record = dict(
                impl=name, B=batch, K=protos, epsilon=eps, num_iters=n_iters, devices=len(devices),
                median_s=seconds, bytes_per_iter=bytes_per_iter, total_bytes=total_bytes,
                gb_per_s=total_bytes / seconds / 1e9, speedup_vs_numpy=t_numpy / seconds,
                max_abs_diff_vs_numpy=float(np.max(np.abs(np.asarray(codes) - reference))),
            )
            records.append(record)
            print(f"{name:<30} {batch:>6} {protos:>6} {1e3 * seconds:>10.2f} {bytes_per_iter / 1e6:>9.1f} "
                  f"{record['gb_per_s']:>7.2f} {record['speedup_vs_numpy']:>8.2f}x "
                  f"{record['max_abs_diff_vs_numpy']:>9.1e}")
        del reference, runs
    for record in records:
        print(json.dumps(record))


if __name__ == "__main__":
    main()
