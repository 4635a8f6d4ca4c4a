"""Sinkhorn-Knopp codes: jitted ``sinkhorn_knopp`` against a NumPy transcription of SwAV's algorithm.

All candidates run on the same float32 (B, K) cosine scores in one process, timed in interleaved rounds
(``common.interleaved``), so each speedup over NumPy is a ratio from one run:

* ``numpy (SwAV)``: SwAV's ``distributed_sinkhorn`` on one process, with its in-place updates;
* ``jax scaling``: the default path (one ``exp``, then matrix-vector products on scaling vectors);
* ``jax log-domain``: ``fast=False``, the overflow-proof fallback (a log-sum-exp per normalisation);
* ``jax data=N`` / ``jax data=N/2 tensor=2``: ``sharded_sinkhorn_knopp`` with rows over N devices, and
  with the prototype axis split in two as well (with ``--devices N``; fake CPU devices on a CPU host).

Traffic model, bytes of (B, K) float32 matrices read or written per run (elementwise work fused):

* NumPy: setup (``/ eps``, ``exp``, total sum, ``/=``) 4 B K x (2 + 2 + 1 + 2); per iteration two sums and
  four in-place divisions, 4 B K x (1 + 2 + 2 + 1 + 2 + 2); the final ``*= B`` 4 B K x 2.
* scaling path: per-prototype max (1 read), ``exp`` (read + write), one matrix-vector product per
  normalisation (2 per iteration, 1 read each), the codes (read + write): 4 B K x (6 + 2 n).
* log domain: per normalisation a max pass and an exp-sum pass (2 reads), the codes (read + write) and
  the scaled logits (read + write): 4 B K x (4 + 4 n).

``GB/s`` is modelled traffic over the median time, shown next to the host's bandwidth measured in the
same run (a jitted read-and-write of a matrix of the same size). The process keeps freed memory mapped
(``--malloc retain``, clus_jax's default, see ``clus_jax.common.hostmem``), since otherwise every fresh output
buffer is page-faulted in at a few GB/s on CPU; ``--malloc system`` times the glibc defaults.

  python bench/sinkhorn.py                     # 1024x3000, 4096x3000, 4096x30000, single device
  python bench/sinkhorn.py --devices 8         # plus the sharded versions on 8 devices
  python bench/sinkhorn.py --sizes 4096x30000 --malloc system
  python bench/sinkhorn.py --quick
"""
from __future__ import annotations

import argparse
import functools
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

FULL_SIZES = "1024x3000,4096x3000,4096x30000"
QUICK_SIZES = "128x100,512x1000"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default=None, help=f"comma-separated BxK (default {FULL_SIZES})")
    parser.add_argument("--quick", action="store_true", help="tiny sizes and few rounds, to check the script")
    parser.add_argument("--devices", type=int, default=1, help="also time the sharded version on this many devices")
    parser.add_argument("--epsilon", type=float, default=0.05)
    parser.add_argument("--num-iters", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=None, help="timed interleaved rounds (after one warm-up)")
    parser.add_argument("--dim", type=int, default=128, help="embedding width used to draw cosine scores")
    parser.add_argument("--malloc", choices=sorted(common.MALLOC_ENVS), default="retain",
                        help="allocator setting for this process (see bench/common.py: MALLOC_ENVS)")
    return parser.parse_args()


@functools.cache
def _swav_reference():
    """The NumPy transcription of SwAV that the tests use as their oracle (``tests/objectives/swav_reference.py``)."""
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "objectives",
                        "swav_reference.py")
    spec = importlib.util.spec_from_file_location("swav_reference", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def swav_sinkhorn_numpy(out, epsilon: float, num_iters: int):
    """SwAV ``distributed_sinkhorn`` on one process, float32 (``tests/objectives/swav_reference.py``)."""
    import numpy as np

    return _swav_reference().swav_sinkhorn_numpy(out, epsilon, num_iters, dtype=np.float32)


def cosine_scores(rng, batch: int, protos: int, dim: int):
    """Cosines between random unit embeddings and random unit prototypes, float32 (batch, protos)."""
    import numpy as np

    z = rng.standard_normal((batch, dim), dtype=np.float32)
    c = rng.standard_normal((protos, dim), dtype=np.float32)
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    return z @ c.T


def traffic_bytes(impl: str, elems: int, n: int) -> int:
    """Modelled bytes of (B, K) float32 traffic for one run (see the module docstring)."""
    if impl.startswith("numpy"):
        return 4 * elems * (7 + 10 * n + 2)
    if "log-domain" in impl:
        return 4 * elems * (4 + 4 * n)
    return 4 * elems * (6 + 2 * n)


def main() -> None:
    args = parse_args()
    common.reexec_with_malloc(args.malloc)
    if args.devices > 1:
        common.set_host_devices(args.devices)

    from functools import partial

    import jax
    import numpy as np
    from jax.sharding import AxisType, NamedSharding
    from jax.sharding import PartitionSpec as P

    from clus_jax.objectives.sinkhorn import sharded_sinkhorn_knopp, sinkhorn_knopp

    sizes = [tuple(int(v) for v in s.lower().split("x")) for s in
             (args.sizes or (QUICK_SIZES if args.quick else FULL_SIZES)).split(",")]
    rounds = args.rounds or (2 if args.quick else 7)
    eps, n_iters = args.epsilon, args.num_iters
    devices = jax.devices()[: args.devices]
    if len(devices) < args.devices:
        raise SystemExit(f"asked for {args.devices} devices, found {len(jax.devices())}")
    info = dict(common.device_info(), epsilon=eps, num_iters=n_iters, rounds=rounds)

    def mesh(shape, names):
        return jax.sharding.Mesh(np.array(devices).reshape(shape), names, axis_types=(AxisType.Auto,) * len(shape))

    layouts = []
    if len(devices) > 1:
        layouts.append((f"jax data={len(devices)}", mesh((len(devices),), ("data",)), "data", None))
        if len(devices) % 2 == 0:
            layouts.append((f"jax data={len(devices) // 2} tensor=2", mesh((len(devices) // 2, 2), ("data", "tensor")),
                            "data", "tensor"))

    rng = np.random.default_rng(0)
    rows = []
    for batch, protos in sizes:
        scores = cosine_scores(rng, batch, protos, args.dim)
        elems = batch * protos
        reference = swav_sinkhorn_numpy(scores, eps, n_iters)
        x = jax.device_put(scores, devices[0])
        scaling = jax.jit(partial(sinkhorn_knopp, epsilon=eps, num_iters=n_iters))
        log_domain = jax.jit(partial(sinkhorn_knopp, epsilon=eps, num_iters=n_iters, fast=False))
        copy = jax.jit(lambda a: a * 2.0)
        outputs = {"numpy (SwAV)": lambda: reference, "jax scaling": lambda: scaling(x),
                   "jax log-domain": lambda: log_domain(x)}
        candidates = {
            "numpy (SwAV)": lambda: swav_sinkhorn_numpy(scores, eps, n_iters),
            "jax scaling": lambda: scaling(x).block_until_ready(),
            "jax log-domain": lambda: log_domain(x).block_until_ready(),
            "_bandwidth": lambda: copy(x).block_until_ready(),
        }
        for name, m, batch_axes, proto_axis in layouts:
            if batch % m.shape[batch_axes] or (proto_axis and protos % m.shape[proto_axis]):
                continue
            fn = jax.jit(partial(sharded_sinkhorn_knopp, mesh=m, batch_axes=batch_axes, proto_axis=proto_axis,
                                 epsilon=eps, num_iters=n_iters))
            xs = jax.device_put(scores, NamedSharding(m, P(batch_axes, proto_axis)))
            candidates[name] = (lambda fn=fn, xs=xs: fn(xs).block_until_ready())
            outputs[name] = (lambda fn=fn, xs=xs: fn(xs))
        times = common.interleaved(candidates, rounds=rounds)
        bandwidth = 8 * elems / min(times.pop("_bandwidth")) / 1e9
        t_numpy = common.median(times["numpy (SwAV)"])
        for name, t in times.items():
            seconds = common.median(t)
            traffic = traffic_bytes(name, elems, n_iters)
            rows.append(dict(bench="sinkhorn", impl=name, B=batch, K=protos, median_s=seconds,
                             spread=common.spread(t), vs_numpy=t_numpy / seconds, traffic_gb=traffic / 1e9,
                             gb_per_s=traffic / seconds / 1e9, host_gb_per_s=bandwidth,
                             max_abs_diff_vs_numpy=float(np.max(np.abs(np.asarray(outputs[name]()) - reference)))))
        del reference, x, outputs, candidates
    print(f"Sinkhorn codes (epsilon {eps}, {n_iters} iterations, cosine scores): {info['device_kind']} x{len(devices)} "
          f"({info['host']}, {info['cpus']} CPUs), jax {info['jax']}, numpy {np.__version__}, malloc {info['malloc']}, "
          f"{info['date']}, load average {info['load_average']}; median of {rounds} interleaved rounds")
    common.print_table(rows, [("impl", "impl", ""), ("B", "B", "d"), ("K", "K", "d"), ("median_s", "s", ".4f"),
                              ("vs_numpy", "x NumPy", ".2f"), ("traffic_gb", "GB moved", ".2f"),
                              ("gb_per_s", "GB/s", ".1f"), ("host_gb_per_s", "host GB/s", ".1f"),
                              ("max_abs_diff_vs_numpy", "max |dq|", ".1e")])
    for row in rows:
        common.emit(dict(info, **row))


if __name__ == "__main__":
    main()
