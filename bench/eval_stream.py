"""Streamed evaluation: host memory stays flat in the evaluation set's size, and its throughput.

Zero-shot classification (``clus_jax.evaluate.benchmarks``, evaluator ``zeroshot``) runs on ``synthetic:N``
(generated 64 px coloured shapes, 24 classes) for two set sizes, each in its own process, so that each peak RSS
(``ru_maxrss``) is that size's own. Images are read, decoded and embedded a batch at a time and only per-class
sums are kept, so the peak at 50,000 images should equal the peak at 5,000: the ratio is the claim. The model is
a small ViT (the encoder is not what is measured; its cost sets the img/s).

  python bench/eval_stream.py                  # 5,000 and 50,000 images
  python bench/eval_stream.py --quick          # 500 and 5,000
  python bench/eval_stream.py --sizes 5000,50000 --batch-size 256
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

TOWER = dict(image_size=32, patch_size=8, width=64, depth=2, heads=2, mlp_dim=256)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(size: int, batch_size: int) -> dict:
    """Builds the model, runs one zero-shot evaluation of ``synthetic:<size>``; peak RSS before and after."""
    import jax
    import ml_collections

    from clus_jax.config import base as config_base
    from clus_jax.evaluate import registry
    from clus_jax.inference import model_from_params, model_shapes
    from clus_jax.objectives.teachers import unboxed

    config = config_base.base_config()
    config.model.image.update(dict(size="tiny", **TOWER))
    config.model.text.update(dict(size="tiny", width=64, depth=2, heads=2, mlp_dim=256))
    config.model.embed_dim = 64
    config.evals = ml_collections.ConfigDict(dict(run="shapes", batch_size=batch_size,
                                                  shapes=dict(type="zeroshot", data=f"synthetic:{size}")))
    module, _, _ = model_shapes(config)
    params = module.init(jax.random.key(0), *_dummy(config))["params"]
    model = model_from_params(config, jax.device_get(unboxed(params)), checkpoint="random init",
                              batch_size=batch_size)
    enc = model.encoders
    ctx = registry.EvalContext(enc.images, enc.texts, ("image", "text"), {}, config, image_rows=enc.image_rows,
                               batch_size=enc.batch_size)
    # A warm-up evaluation on a few images compiles every shape first, so the peak below is the stream's.
    warm = ml_collections.ConfigDict(config.to_dict())
    warm.evals.shapes.data = f"synthetic:{enc.batch_size}"
    registry.run(warm, ctx)
    before = peak_rss_mib()
    t0 = time.perf_counter()
    out = registry.run(config, ctx)
    wall = time.perf_counter() - t0
    return dict(size=size, batch_size=enc.batch_size, peak_rss_before_mib=round(before, 1),
                peak_rss_mib=round(peak_rss_mib(), 1), wall_s=round(wall, 2),
                images_per_second=round(out.metrics["eval_speed/shapes/images_per_second"], 1),
                top1=out.metrics["zeroshot/shapes/top1"], decode_errors=out.metrics["zeroshot/shapes/decode_errors"])


def _dummy(config):
    import numpy as np

    s = int(config.model.image.image_size)
    return np.zeros((1, s, s, 3), np.uint8), np.zeros((1, int(config.model.text.context_length)), np.int32)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="5000,50000", help="set sizes, comma-separated")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--quick", action="store_true", help="500 and 5,000 images")
    p.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker is not None:
        print("RESULT " + json.dumps(worker(args.worker, args.batch_size)), flush=True)
        return
    sizes = [500, 5000] if args.quick else [int(s) for s in args.sizes.split(",")]
    rows = []
    for size in sizes:
        proc = subprocess.run([sys.executable, __file__, "--worker", str(size), "--batch-size", str(args.batch_size)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"error: worker for {size} images failed:\n{proc.stderr[-3000:]}")
        rows.append(json.loads(next(l for l in proc.stdout.splitlines() if l.startswith("RESULT "))[len("RESULT "):]))
    from host import xla_matmul_gflops

    info = dict(host=common.cpu_model(), ids=common.family().get("ids"), matmul_gflops=round(xla_matmul_gflops(), 1),
                cpus=os.cpu_count(), load_average=common.load_average())
    common.print_table(rows, [("size", "images", "d"), ("batch_size", "batch", "d"),
                              ("peak_rss_before_mib", "RSS before MiB", ".1f"), ("peak_rss_mib", "peak RSS MiB", ".1f"),
                              ("images_per_second", "img/s", ".1f"), ("wall_s", "wall s", ".1f"),
                              ("decode_errors", "decode errors", ".0f")])
    ratio = rows[-1]["peak_rss_mib"] / rows[0]["peak_rss_mib"]
    print(f"peak RSS at {sizes[-1]} / at {sizes[0]} images: {ratio:.3f}  "
          f"({info['host']}, XLA f32 matmul {info['matmul_gflops']} GFLOP/s)")
    for r in rows:
        common.emit({"bench": "eval_stream", **r, **info})
    common.emit({"bench": "eval_stream", "peak_rss_ratio": round(ratio, 4), "sizes": sizes, **info})


if __name__ == "__main__":
    main()
