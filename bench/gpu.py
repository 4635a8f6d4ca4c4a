"""One-GPU measurement in one command: the figures of the issue's GPU table, one JSON line per figure.

On one NVIDIA GPU (H100/H200 class), with only ``jax[cuda]`` and the project's own dependencies, within about
8 minutes (``--budget-s``; a figure that would start after the budget is recorded as skipped):

  * ``gpu/clip``: ViT-B/16 (224 px) + 12-layer 512-wide text tower (77 tokens), CLIP, bfloat16 compute with
    float32 master weights, at the largest per-device batch that fits, without and with ``model.remat``:
    step time, images/s and MFU against the datasheet dense bf16 peak (``common.PEAK_TFLOPS``, found from
    the device kind). The search compiles (never runs) a probe batch, extrapolates the batch that fills
    the device from ``memory_analysis()``, compiles that, and steps down when it does not fit or a run
    fails with out-of-memory.
  * ``gpu/swap``: the swap objective on the same towers at K = 3000 and 65,536 (batch: CLIP's largest).
  * ``gpu/mlcd``: the mlcd objective at K = 1,000,000 centres, if ``mlcd`` is registered.
  * ``gpu/kmeans``: seconds per Lloyd iteration of ``clus_jax.clustering.kmeans``, 1M points x 768 into
    65,536 centres, if that module exists.
  * ``gpu/device``: device kind, memory, peak, the XLA flags and versions (also in every other line).

  bench/gpu.sh                    # the full measurement (the wrapper only runs this script)
  bench/gpu.sh --quick            # the same code path at tiny sizes, on CPU, in seconds (the smoke test)
  python bench/gpu.py --only clip --budget-s 300

XLA flags: ``GPU_XLA_FLAGS`` below are set before JAX starts (any ``XLA_FLAGS`` already in the environment
come after them and win) unless ``--quick``. Compiled programs are cached in ``--cache-dir`` so a rerun skips
the compiles.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

GPU_XLA_FLAGS = [
    # Overlap asynchronous work with compute instead of running it back to back.
    "--xla_gpu_enable_latency_hiding_scheduler=true",
    # Triton GEMM fusions on (the default): fuse the bf16 casts and bias adds into the matmuls.
    "--xla_gpu_enable_triton_gemm=true",
]
MEM_FRACTION = "0.92"  # XLA_PYTHON_CLIENT_MEM_FRACTION: room for activations; the rest for CUDA itself
FIT_FRACTION = 0.94  # the compiled step's predicted bytes must stay below this share of the device limit
QUICK = dict(image_size=32, patch_size=8, vision_width=64, vision_layers=2, vision_heads=2, embed_dim=64,
             context_length=16, vocab_size=1000, text_width=64, text_layers=2, text_heads=2, mlp_ratio=4,
             batch_size=16)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes on any device (CPU): checks the script")
    p.add_argument("--budget-s", type=float, default=None,
                   help="no new figure starts after this many seconds (default 480; none with --quick)")
    p.add_argument("--only", default="clip,swap,mlcd,kmeans", help="comma-separated figures to record")
    p.add_argument("--steps", type=int, default=5, help="timed steps per figure (after two warm-up steps)")
    p.add_argument("--probe-batch", type=int, default=128, help="per-device batch of the compile-only probe")
    p.add_argument("--batch-multiple", type=int, default=32, help="searched batches are multiples of this")
    p.add_argument("--memory-gb", type=float, default=0.0, help="device memory to fill (0: the device's limit)")
    p.add_argument("--cache-dir", default="/tmp/clus_jax/gpu_bench_cache", help="persistent compilation cache")
    return p.parse_args()


class Bench:
    """Budget, device facts and the JSON lines of one measurement."""

    def __init__(self, args: argparse.Namespace):
        import jax

        self.args, self.start = args, time.monotonic()
        self.info = common.device_info()
        device = jax.devices()[0]
        stats = (device.memory_stats() or {}) if hasattr(device, "memory_stats") else {}
        if args.memory_gb:
            self.limit = int(args.memory_gb * 2**30)
        elif args.quick:
            self.limit = None  # largest_batch pretends the device holds 3x the probe batch's bytes
        else:
            self.limit = int(stats.get("bytes_limit", 0)) or None
        self.peak_tflops = common.datasheet_peak_tflops(self.info["device_kind"], "bfloat16")

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def over_budget(self) -> bool:
        return self.elapsed() > self.args.budget_s

    def emit(self, bench: str, **record: Any) -> None:
        common.emit(dict(self.info, bench=bench, elapsed_s=round(self.elapsed(), 1), **record))


def clip_config(args: argparse.Namespace, objective: str, batch: int, remat: bool, **knobs: Any):
    """ViT-B/16 + 12x512 text tower in bf16 (tiny towers with ``--quick``), one device, random data."""
    from clus_jax.config import base as config_base

    if args.quick:
        common.ARCHS["quick"] = QUICK
        config = common.arch_config("quick", objective, batch_size=batch, dtype="bfloat16", remat=remat)
    else:
        config = config_base.base_config()
        config_base.use_named_size(config.model.image, "B/16")
        config_base.use_named_size(config.model.text, "base")
        config.model.image.update(dict(image_size=224, conv_stem=()))  # the plain ViT patchify of B/16
        config.model.text.update(dict(context_length=77, vocab_size=49408))
        config.model.embed_dim = 512
        config.model.dtype = "bfloat16"
        config.model.remat = remat
        config.data.source = "synthetic"
        config.evals.run = "none"
        common.configure_objective(config, objective)
    config.batch_size = batch
    config.total_steps = 1000
    config.mesh.update(dict(data=1, fsdp=1, tensor=1))
    for key, value in knobs.items():
        config_base.set_dotted(config, key, value)
    return config


def _is_oom(error: Exception) -> bool:
    text = str(error)
    return "RESOURCE_EXHAUSTED" in text or "Out of memory" in text or "out of memory" in text


def compile_for(config):
    """(experiment, compiled step, predicted device bytes) without allocating anything."""
    import jax

    from clus_jax.train.experiment import build

    exp = build(config, jax.devices()[:1])
    with jax.set_mesh(exp.mesh):
        compiled = exp.step.jitted.lower(exp.abstract_state, exp.abstract_batch()).compile()
    m = compiled.memory_analysis()
    total = (m.argument_size_in_bytes + m.temp_size_in_bytes
             + max(m.output_size_in_bytes - m.alias_size_in_bytes, 0)) if m is not None else 0
    return exp, compiled, int(total)


def time_step(exp, compiled, steps: int) -> tuple[float, float]:
    """(median seconds per step, loss) of the compiled step on a random batch, after two warm-up steps."""
    import jax
    import numpy as np

    batch = common.random_batch(exp.config)
    extra = exp.dummy_batch()  # declared fields beyond the towers' inputs (e.g. cluster labels)
    batch = exp.global_batch({**extra, **batch})
    state = exp.init_state()
    for _ in range(2):
        state, metrics = compiled(state, batch)
    jax.block_until_ready(state)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        state, metrics = compiled(state, batch)
        jax.block_until_ready(state)
        times.append(time.perf_counter() - t0)
    return float(np.median(times)), float(metrics["loss"])


def step_record(bench: Bench, exp, seconds: float, loss: float, predicted: int) -> dict[str, Any]:
    from clus_jax.train import flops as train_flops

    config = exp.config
    step_flops = exp.train_step_flops()
    peak = bench.peak_tflops
    return dict(objective=",".join(config.objectives), batch=int(config.batch_size), remat=bool(config.model.remat),
                dtype=str(config.model.dtype), step_s=seconds, images_per_s=int(config.batch_size) / seconds,
                tflops_per_s=step_flops / seconds / 1e12, gflops_per_step=step_flops / 1e9,
                mfu=train_flops.mfu(step_flops, seconds, peak * 1e12) if peak else None, peak_tflops=peak,
                predicted_device_gib=predicted / 2**30, device_limit_gib=(bench.limit or 0) / 2**30, loss=loss)


def largest_batch(bench: Bench, make_config) -> tuple[Any, Any, int]:
    """(experiment, compiled step, predicted bytes) at the largest batch that fits ``bench.limit``.

    One compile-only probe gives bytes per example; the batch that fills the device is compiled next and
    stepped down by 1/8 until its prediction fits. Without a known limit the probe batch is used."""
    args = bench.args
    probe = 8 if args.quick else args.probe_batch
    exp, compiled, predicted = compile_for(make_config(probe))
    limit = bench.limit or (3 * predicted if args.quick else None)
    if not limit or not predicted:
        return exp, compiled, predicted
    fixed = 0
    for part in ("params", "opt_state", "objective_states"):
        fixed += _bytes(exp.abstract_state[part])
    per_example = max(predicted - fixed, 1) / probe
    multiple = 4 if args.quick else args.batch_multiple
    batch = max(int((FIT_FRACTION * limit - fixed) / per_example) // multiple * multiple, multiple)
    while batch > probe:
        exp2, compiled2, predicted2 = compile_for(make_config(batch))
        if predicted2 <= FIT_FRACTION * limit:
            return exp2, compiled2, predicted2
        batch = max((batch * 7 // 8) // multiple * multiple, probe)
    return exp, compiled, predicted


def _bytes(tree) -> int:
    import jax

    return sum(int(x.size) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def run_figure(bench: Bench, name: str, make_config, *, search: bool, batch: int | None = None, **extra) -> int | None:
    """Compiles (searching the batch if asked), times and emits one figure; returns the batch it ran."""
    if bench.over_budget():
        bench.emit(name, skipped=f"time budget {bench.args.budget_s:.0f} s spent", **extra)
        return None
    t0 = time.monotonic()
    try:
        if search:
            exp, compiled, predicted = largest_batch(bench, make_config)
        else:
            exp, compiled, predicted = compile_for(make_config(batch))
        for _ in range(3):  # a run that still does not fit steps down by 1/8
            try:
                seconds, loss = time_step(exp, compiled, 2 if bench.args.quick else bench.args.steps)
                break
            except Exception as e:  # noqa: BLE001 (XLA's runtime errors have no finer type)
                if not _is_oom(e):
                    raise
                smaller = max(int(exp.config.batch_size) * 7 // 8 // 8 * 8, 8)
                exp, compiled, predicted = compile_for(make_config(smaller))
        else:
            raise RuntimeError("out of memory at every batch tried")
    except Exception as e:  # noqa: BLE001 (a figure that cannot run is recorded, the rest still run)
        bench.emit(name, error=f"{type(e).__name__}: {str(e)[:500]}", **extra)
        return None
    bench.emit(name, **extra, **step_record(bench, exp, seconds, loss, predicted), wall_s=time.monotonic() - t0)
    return int(exp.config.batch_size)


def kmeans_figure(bench: Bench) -> None:
    """Seconds per Lloyd iteration: the difference of a 1- and a 3-iteration run (after a compiling run) over the
    2 extra iterations, so transfers, initialisation and compiles cancel."""
    import numpy as np

    try:
        from clus_jax import clustering

        kmeans = clustering.kmeans
    except (ImportError, AttributeError):
        bench.emit("gpu/kmeans", skipped="clus_jax.clustering.kmeans is not available")
        return
    if bench.over_budget():
        bench.emit("gpu/kmeans", skipped=f"time budget {bench.args.budget_s:.0f} s spent")
        return
    n, d, k = (4096, 16, 64) if bench.args.quick else (1_000_000, 768, 65_536)
    points = np.random.default_rng(0).standard_normal((n, d), dtype=np.float32)
    try:
        times = {}
        for run, iters in enumerate((1, 1, 3)):  # the first run compiles
            t0 = time.perf_counter()
            result = kmeans(points, k, num_iters=iters, seed=0)
            times["compile" if run == 0 else iters] = time.perf_counter() - t0
    except Exception as e:  # noqa: BLE001
        bench.emit("gpu/kmeans", error=f"{type(e).__name__}: {str(e)[:500]}", points=n, dim=d, k=k)
        return
    per_iter = max(times[3] - times[1], 0.0) / 2
    bench.emit("gpu/kmeans", points=n, dim=d, k=k, s_per_iteration=per_iter, first_run_s=times["compile"], one_iteration_run_s=times[1],
               num_iters_run=int(result.num_iters_run),
               gflop_per_iteration=2.0 * n * k * d / 1e9,
               tflops_per_s=2.0 * n * k * d / per_iter / 1e12 if per_iter else None)


def main() -> None:
    args = parse_args()
    if args.budget_s is None:
        args.budget_s = float("inf") if args.quick else 480.0
    if not args.quick:
        os.environ["XLA_FLAGS"] = " ".join(GPU_XLA_FLAGS + [os.environ.get("XLA_FLAGS", "")]).strip()
        os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", MEM_FRACTION)
        os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", args.cache_dir)
    import jax

    from clus_jax.objectives import registry

    if not args.quick and jax.devices()[0].platform != "gpu":
        print(f"warning: running on {jax.devices()[0].platform}, not a GPU; use --quick to check the script",
              file=sys.stderr)
    bench = Bench(args)
    only = set(args.only.split(","))
    bench.emit("gpu/device", memory_limit_gib=(bench.limit or 0) / 2**30, peak_tflops_bf16=bench.peak_tflops,
               mem_fraction=os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION"),
               budget_s=args.budget_s if math.isfinite(args.budget_s) else None)
    best = None
    if "clip" in only:
        for remat in (False, True):  # --quick: remat at the batch found without it (one compile fewer)
            ran = run_figure(bench, "gpu/clip", lambda b, r=remat: clip_config(args, "clip", b, r),
                             search=not (remat and args.quick and best), batch=best)
            if not remat:
                best = ran
    batch = best or (16 if args.quick else 256)
    if "swap" in only:
        for k in (30, 100) if args.quick else (3000, 65_536):
            run_figure(bench, "gpu/swap", lambda b, k=k: clip_config(args, "swap", b, False, **{
                "swap.num_prototypes": (k,)}), search=False, batch=batch, num_prototypes=k)
    if "mlcd" in only:
        if "mlcd" in registry.names():
            k = 1000 if args.quick else 1_000_000
            run_figure(bench, "gpu/mlcd", lambda b: clip_config(args, "mlcd", b, False, **{"mlcd.num_classes": k}),
                       search=False, batch=batch, num_classes=k)
        else:
            bench.emit("gpu/mlcd", skipped="objective 'mlcd' is not registered")
    if "kmeans" in only:
        kmeans_figure(bench)
    bench.emit("gpu/done", total_s=bench.elapsed())


if __name__ == "__main__":
    main()
