"""k-means: clus_jax against faiss-cpu on the same points, K, iterations and initial centres.

Three parts, each printed as a table and as JSON lines:

* ``speed``: seconds per Lloyd iteration (one pass: assignment + update) of ``clus_jax.clustering`` on one
  device and of ``faiss.Kmeans`` (``max_points_per_centroid`` raised so faiss uses every point), timed in
  interleaved rounds from the same centres (``common.interleaved``), and the inertia (mean squared distance,
  both evaluated by the same exact faiss search) after ``--iters`` iterations of each from the same
  initial centres. Points are Gaussian blobs (K/4 blob centres, so clusters are neither trivial nor absent).
* ``sharded`` (``--devices N``, a child process with N fake CPU devices): the same iteration on meshes of N
  devices (centres over all of them; points over 2 and centres over N/2), next to one device and faiss in
  the same process. Fake devices share the host's cores, so this shows the cost of the collectives and
  the per-device blocking, not a speed-up.
* ``memory`` (``--memory-devices``, one child process per count, compiled only, nothing runs): per-device
  memory of one chunk step and of the centre update at K = 1M, D = 768 (``memory_analysis`` of the
  compiled programs), and the bytes each device sends per iteration through collectives, read from the
  compiled HLO (all-reduce/all-gather/reduce-scatter results) over a pass of ``--memory-points`` points.

    python bench/kmeans.py --quick
    python bench/kmeans.py                                   # 100000x64x1024 and 300000x128x4096
    python bench/kmeans.py --sizes 1000000x128x16384 --iters 1 --rounds 1 --warmup 0 --judge-points 100000 \
        --devices 0 --memory-devices ""

With ``--iters 1`` the inertia compared is that of the timed iterations' own output (each starts from the
initial centres), so a large size costs one iteration and one exact search per library.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

FULL_SIZES = "100000x64x1024,300000x128x4096"
QUICK_SIZES = "20000x32x256"
MEMORY_K, MEMORY_D = 1_000_000, 768


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default=None, help=f"comma-separated NxDxK (default {FULL_SIZES})")
    p.add_argument("--quick", action="store_true", help="tiny sizes, to check the script")
    p.add_argument("--iters", type=int, default=None, help="iterations before comparing inertia (default 10)")
    p.add_argument("--rounds", type=int, default=None, help="timed interleaved rounds (default 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls of each candidate first (0 for sizes "
                   "where compiling is negligible next to one iteration)")
    p.add_argument("--judge-points", type=int, default=0,
                   help="inertia judged on the first this many points (0: all; the points are in random order)")
    p.add_argument("--devices", type=int, default=8, help="fake devices of the sharded part (0: skip it)")
    p.add_argument("--sharded-sizes", default=None, help="sizes of the sharded part (default: the first size)")
    p.add_argument("--memory-devices", default=None,
                   help="device counts of the compiled memory figures (default 8,64,256; --quick: 8)")
    p.add_argument("--memory-points", type=int, default=20_000_000, help="points per pass in the traffic figure")
    p.add_argument("--block-k", type=int, default=1024)
    p.add_argument("--chunk-rows", type=int, default=8192, help="points per step (per data shard)")
    p.add_argument("--part", choices=["all", "speed", "sharded", "memory"], default="all", help=argparse.SUPPRESS)
    p.add_argument("--malloc", choices=sorted(common.MALLOC_ENVS), default="retain")
    return p.parse_args(argv)


def parse_sizes(text: str) -> list[tuple[int, int, int]]:
    return [tuple(int(v) for v in s.lower().split("x")) for s in text.split(",") if s]


def blobs(n: int, d: int, k: int, seed: int = 0):
    """float32 [n, d] Gaussian blobs around max(1, k/4) centres, and k distinct points as initial centres."""
    import numpy as np

    rng = np.random.default_rng(seed)
    means = rng.normal(size=(max(1, k // 4), d)).astype(np.float32) * 2.0
    x = means[rng.integers(0, len(means), n)] + rng.normal(size=(n, d)).astype(np.float32)
    init = x[np.sort(rng.choice(n, k, replace=False))].copy()
    return x, init


class ClusJaxIteration:
    """One Lloyd iteration of clus_jax.clustering.kmeans (the pass and the update of its driver loop, without
    checkpoints) on a mesh, from fixed centres, so every timed call does the same work."""

    def __init__(self, x, init, mesh, block_k: int, chunk_rows: int):
        import jax

        from clus_jax.clustering import blocked
        from clus_jax.clustering.kmeans import _chunk_rows, accumulate_fn, update_fn, zero_accumulators
        from clus_jax.clustering.stream import PointStream

        self.jax, self.zero = jax, zero_accumulators
        self.layout = layout = blocked.make_layout(mesh, init.shape[0], block_k)
        self.stream = PointStream(x)
        self.rows = _chunk_rows(chunk_rows * layout.point_shards, self.stream, layout)
        self.acc, self.upd = accumulate_fn(layout, "euclidean"), update_fn(layout, "euclidean")
        self.x_sharding = layout.sharding(layout.points_spec())
        self.centers = blocked.pad_centers(init, layout, "euclidean")
        self.center_sq = jax.jit(blocked.center_sqnorms)(self.centers)
        self.dim = x.shape[1]

    def __call__(self):
        import numpy as np

        sums, counts = self.zero(self.layout, self.dim)
        for _, chunk, n in self.stream.chunks(self.rows):
            sums, counts, _, _ = self.acc(self.jax.device_put(chunk, self.x_sharding),
                                          self.jax.device_put(np.arange(self.rows) < n, self.x_sharding),
                                          self.centers, self.center_sq, sums, counts)
        out = self.upd(self.centers, sums, counts)
        self.jax.block_until_ready(out)
        return out


def faiss_iteration(x, init):
    import faiss

    def run():
        km = faiss.Kmeans(x.shape[1], init.shape[0], niter=1, max_points_per_centroid=1 << 30, seed=1, verbose=False)
        km.train(x, init_centroids=init)
        return km.centroids
    return run


def faiss_inertia(x, centers, judge_points: int = 0) -> float:
    """Mean squared distance of every point (or of the first ``judge_points``: the points are in random
    order) to its nearest centre, by exact faiss search: the common judge of both libraries."""
    import faiss
    import numpy as np

    if judge_points:
        x = x[:judge_points]
    index = faiss.IndexFlatL2(centers.shape[1])
    index.add(np.ascontiguousarray(centers, np.float32))
    dist, _ = index.search(x, 1)
    return float(np.asarray(dist, np.float64).mean())


def speed_rows(sizes, args, mesh_layouts) -> list[dict]:
    import faiss
    import numpy as np

    from clus_jax.clustering import kmeans
    from clus_jax.parallel.multihost import to_host

    rows = []
    for n, d, k in sizes:
        x, init = blobs(n, d, k)
        candidates = {"faiss": faiss_iteration(x, init)}
        for name, mesh in mesh_layouts:
            candidates[name] = ClusJaxIteration(x, init, mesh, args.block_k, args.chunk_rows)
        outputs = {}

        def keep(name, fn):
            def run():
                outputs[name] = fn()
            return run

        times = common.interleaved({name: keep(name, fn) for name, fn in candidates.items()}, rounds=args.rounds,
                                   warmup=args.warmup)
        t_faiss = common.median(times["faiss"])
        inertia = {}
        if args.iters == 1:  # every timed call starts from the initial centres: judge its output
            inertia["faiss"] = faiss_inertia(x, outputs["faiss"], args.judge_points)
            inertia["clus_jax"] = faiss_inertia(x, to_host(outputs[mesh_layouts[0][0]][0])[:k], args.judge_points)
        elif args.iters:
            km = faiss.Kmeans(d, k, niter=args.iters, max_points_per_centroid=1 << 30, seed=1, verbose=False)
            km.train(x, init_centroids=init)
            inertia["faiss"] = faiss_inertia(x, km.centroids, args.judge_points)
            for name, mesh in mesh_layouts[:1]:  # the same algorithm on every mesh (tests): one run
                result = kmeans(x, k, num_iters=args.iters, init=init, mesh=mesh, block_k=args.block_k,
                                chunk_rows=args.chunk_rows)
                inertia["clus_jax"] = faiss_inertia(x, result.centers, args.judge_points)
        flops = 2.0 * n * k * d
        for name, t in times.items():
            seconds = common.median(t)
            row = dict(bench="kmeans", part="speed", impl=name, N=n, D=d, K=k, s_per_iter=seconds,
                       spread=common.spread(t), vs_faiss=seconds / t_faiss, gflops=flops / seconds / 1e9)
            if args.iters:
                own = inertia["faiss" if name == "faiss" else "clus_jax"]
                row.update(iters=args.iters, inertia=own, inertia_vs_faiss=own / inertia["faiss"] - 1.0)
            rows.append(row)
        del x, init, candidates
    return rows


def speed_table(rows, title: str) -> None:
    print(title)
    common.print_table(rows, [("impl", "impl", ""), ("N", "N", "d"), ("D", "D", "d"), ("K", "K", "d"),
                              ("s_per_iter", "s/iter", ".3f"), ("vs_faiss", "time / faiss", ".2f"),
                              ("gflops", "GFLOP/s", ".1f"), ("iters", "iters", ""),
                              ("inertia", "inertia", ".5f"), ("inertia_vs_faiss", "inertia vs faiss", "+.2%")])


# ------------------------------------------------------------------------------------------- memory

_COLLECTIVE = re.compile(r"=\s*(\([^=]*?\)|[a-z0-9]+\[[\d,]*\](?:\{[^}]*\})?)\s+"
                         r"(all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute)(-start)?\(")
_SHAPE = re.compile(r"(f64|f32|bf16|f16|s64|s32|s8|u64|u32|u8|pred)\[([\d,]*)\]")
_BYTES = {"f64": 8, "s64": 8, "u64": 8, "f32": 4, "s32": 4, "u32": 4, "bf16": 2, "f16": 2, "s8": 1, "u8": 1,
          "pred": 1}


def collective_bytes(hlo: str) -> dict[str, int]:
    """Bytes of the results of each kind of collective in a compiled (per-device) HLO module."""
    out: dict[str, int] = {}
    for m in _COLLECTIVE.finditer(hlo):
        shapes = _SHAPE.findall(m.group(1))
        if m.group(3):  # async start: (operand, result) tuple, count the result
            shapes = shapes[-1:]
        size = sum(_BYTES[t] * math.prod(int(v) for v in dims.split(",") if v) for t, dims in shapes)
        out[m.group(2)] = out.get(m.group(2), 0) + int(size)
    return out


def memory_rows(args) -> list[dict]:
    import jax
    import numpy as np
    from jax.sharding import Mesh

    from clus_jax.clustering import blocked
    from clus_jax.clustering.kmeans import accumulate_fn, update_fn

    count = jax.device_count()
    rows = []
    shapes = [(1, count)] + ([(count // 8, 8)] if count > 8 else [])
    for data, tensor in shapes:
        mesh = Mesh(np.asarray(jax.devices()).reshape(data, 1, tensor), ("data", "fsdp", "tensor"))
        layout = blocked.make_layout(mesh, MEMORY_K, args.block_k)
        rows_per_step = args.chunk_rows * data
        S = jax.ShapeDtypeStruct
        pts, ctr, acc = (layout.sharding(layout.points_spec()), layout.sharding(layout.centers_spec()),
                         layout.sharding(layout.accumulator_spec()))
        x = S((rows_per_step, MEMORY_D), np.float32, sharding=pts)
        valid = S((rows_per_step,), np.bool_, sharding=pts)
        centers = S((layout.padded_k, MEMORY_D), np.float32, sharding=ctr)
        center_sq = S((layout.padded_k,), np.float32, sharding=ctr)
        sums = S((data, layout.padded_k, MEMORY_D), np.float32, sharding=acc)
        counts = S((data, layout.padded_k), np.int32, sharding=acc)
        step = accumulate_fn(layout, "euclidean").lower(x, valid, centers, center_sq, sums, counts).compile()
        update = update_fn(layout, "euclidean").lower(centers, sums, counts).compile()
        steps = -(-args.memory_points // rows_per_step)
        step_mem, update_mem = step.memory_analysis(), update.memory_analysis()
        step_coll, update_coll = collective_bytes(step.as_text()), collective_bytes(update.as_text())
        per_iter = steps * sum(step_coll.values()) + sum(update_coll.values())
        peak = max(step_mem.argument_size_in_bytes + step_mem.output_size_in_bytes - step_mem.alias_size_in_bytes
                   + step_mem.temp_size_in_bytes,
                   update_mem.argument_size_in_bytes + update_mem.output_size_in_bytes + update_mem.temp_size_in_bytes)
        rows.append(dict(bench="kmeans", part="memory", devices=count, mesh=f"data={data} tensor={tensor}",
                         K=MEMORY_K, D=MEMORY_D, rows_per_step=rows_per_step, points=args.memory_points,
                         step_args_gb=step_mem.argument_size_in_bytes / 1e9, step_temp_gb=step_mem.temp_size_in_bytes / 1e9,
                         update_temp_gb=update_mem.temp_size_in_bytes / 1e9, peak_gb=peak / 1e9,
                         step_collective_kb=sum(step_coll.values()) / 1e3,
                         update_collective_gb=sum(update_coll.values()) / 1e9, collectives_gb_per_iter=per_iter / 1e9,
                         point_input_gb_per_iter=args.memory_points * MEMORY_D * 4 / data / 1e9,
                         step_collectives=step_coll, update_collectives=update_coll))
    return rows


def memory_table(rows) -> None:
    print(f"Compiled only: one k-means iteration at K={MEMORY_K:,}, D={MEMORY_D}, per device "
          f"(a pass of {rows[0]['points']:,} points)" if rows else "")
    common.print_table(rows, [("devices", "devices", "d"), ("mesh", "mesh", ""), ("rows_per_step", "rows/step", "d"),
                              ("step_args_gb", "step args GB", ".3f"), ("step_temp_gb", "step temp GB", ".3f"),
                              ("update_temp_gb", "update temp GB", ".3f"), ("peak_gb", "peak GB", ".3f"),
                              ("step_collective_kb", "collective KB/step", ".1f"),
                              ("update_collective_gb", "update collective GB", ".3f"),
                              ("collectives_gb_per_iter", "collective GB/iter", ".3f"),
                              ("point_input_gb_per_iter", "points read GB/iter", ".2f")])


# --------------------------------------------------------------------------------------------- main

def child(part: str, devices: int, args: argparse.Namespace, extra: list[str]) -> list[dict]:
    env = dict(os.environ)
    env["XLA_FLAGS"] = re.sub(r"--xla_force_host_platform_device_count=\S+", "", env.get("XLA_FLAGS", "")).strip()
    env["XLA_FLAGS"] += f" --xla_force_host_platform_device_count={devices}"
    argv = [sys.executable, os.path.abspath(__file__), "--part", part, "--block-k", str(args.block_k),
            "--chunk-rows", str(args.chunk_rows), "--malloc", args.malloc, *extra]
    proc = subprocess.run(argv, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{part} on {devices} devices failed:\n{proc.stderr[-3000:]}")
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def main(argv=None) -> None:
    args = parse_args(argv)
    common.reexec_with_malloc(args.malloc)
    if args.rounds is None:
        args.rounds = 2 if args.quick else 3
    if args.iters is None:
        args.iters = 3 if args.quick else 10
    if args.memory_devices is None:
        args.memory_devices = "8" if args.quick else "8,64,256"
    sizes = parse_sizes(args.sizes or (QUICK_SIZES if args.quick else FULL_SIZES))
    if args.part == "memory":
        for row in memory_rows(args):
            common.emit(row)
        return

    import jax
    import numpy as np
    from jax.sharding import Mesh

    info = common.device_info()
    if args.part == "sharded":
        devices = jax.devices()
        n = len(devices)
        layouts = [("clus_jax 1 device", None),
                   (f"clus_jax tensor={n}", Mesh(np.asarray(devices).reshape(1, 1, n), ("data", "fsdp", "tensor"))),
                   (f"clus_jax data=2 tensor={n // 2}",
                    Mesh(np.asarray(devices).reshape(2, 1, n // 2), ("data", "fsdp", "tensor")))]
        for row in speed_rows(sizes, args, layouts):
            common.emit(dict(info, **{**row, "part": "sharded", "devices": n}))
        return

    rows = speed_rows(sizes, args, [("clus_jax", None)])
    print(f"k-means, one Lloyd iteration from the same centres: {info['device_kind']} ({info['host']}, {info['cpus']} "
          f"CPUs), jax {info['jax']}, {info['date']}, load average {info['load_average']}; median of {args.rounds} "
          f"interleaved rounds; block_k {args.block_k}, chunk {args.chunk_rows} rows")
    speed_table(rows, "")
    for row in rows:
        common.emit(dict(info, **row))
    if args.devices > 1 and args.part == "all":
        sharded_sizes = args.sharded_sizes or ",".join(f"{n}x{d}x{k}" for n, d, k in sizes[:1])
        extra = ["--sizes", sharded_sizes, "--rounds", str(args.rounds), "--iters", str(args.iters)]
        rows = child("sharded", args.devices, args, extra)
        speed_table(rows, f"\nThe same iteration on {args.devices} fake CPU devices (they share the host's cores):")
        for row in rows:
            common.emit(row)
    counts = [int(c) for c in args.memory_devices.split(",") if c] if args.part == "all" else []
    if counts:
        rows = []
        for c in counts:
            rows += child("memory", c, args, ["--memory-points", str(args.memory_points)])
        print()
        memory_table(rows)
        for row in rows:
            common.emit(row)


if __name__ == "__main__":
    main()
