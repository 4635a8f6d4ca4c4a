"""GradCache memory on paper: compiled temporaries of a large global batch in micro-batches vs a small batch.

The train step is compiled (never run) for one device at global batch ``--small`` with one micro-batch and at
``--large`` with ``--large / --small`` micro-batches (``config.microbatches``), and at ``--large`` in one
batch for reference. ``compiled.memory_analysis()`` temp bytes (XLA:CPU's buffer assignment: activations,
gradients, workspace) show what the large batch costs beyond the small one: the global-batch losses and the
cached [B, D] outputs and their gradients, not the towers' activations.

  python bench/microbatch_memory.py                        # ViT-B/16 + 12x512 text, CLIP, 1024 vs 8192 / 8
  python bench/microbatch_memory.py --model S --objective swap
  python bench/microbatch_memory.py --quick
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
import memory  # noqa: E402

MIB = 2**20


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=("B/16", "S", "T"), default="B/16",
                   help="B/16: ViT-B/16 224 px + 12-layer 512-wide text (77 tokens); S, T: bench/common.py ARCHS")
    p.add_argument("--objective", default="clip")
    p.add_argument("--small", type=int, default=1024, help="global batch of the one-batch step")
    p.add_argument("--large", type=int, default=8192, help="global batch of the micro-batched step")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--no-reference", action="store_true", help="skip compiling --large in one batch")
    p.add_argument("--quick", action="store_true", help="tiny model, batches 8 and 64")
    return p.parse_args()


def config_for(args: argparse.Namespace, batch: int, microbatches: int):
    if args.quick:
        config = memory.tiny_config(args.objective, batch, 100)
    elif args.model == "B/16":
        config = memory.scale_config(batch, 1, args.dtype, False, False)
        common.configure_objective(config, args.objective)
    else:
        config = common.arch_config(args.model, args.objective, batch_size=batch, dtype=args.dtype)
    config.batch_size = batch
    config.mesh.update(dict(data=1, fsdp=1, tensor=1))
    config.microbatches = microbatches
    return config


def main() -> None:
    args = parse_args()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax

    small, large = (8, 64) if args.quick else (args.small, args.large)
    cases = [(small, 1), (large, large // small)] + ([] if args.no_reference else [(large, 1)])
    info, rows = common.device_info(), []
    for batch, m in cases:
        compiled, _, seconds = memory.compile_step(config_for(args, batch, m), jax.devices()[:1])
        stats = memory.memory_stats(compiled)
        rows.append(dict(bench="memory/microbatches", model="quick" if args.quick else args.model,
                         objective=args.objective, dtype=args.dtype, global_batch=batch, microbatches=m,
                         micro_batch=batch // m, temp_mib=stats["temp_bytes"] / MIB, compile_s=seconds, **stats))
        print(f"compiled batch {batch} / {m} micro-batches: temp {stats['temp_bytes'] / MIB:.1f} MiB "
              f"({seconds:.0f} s)", flush=True)
    base = rows[0]["temp_bytes"]
    for row in rows:
        row["temp_vs_small"] = row["temp_bytes"] / max(base, 1)
    common.print_table(rows, [("global_batch", "global B", "d"), ("microbatches", "M", "d"),
                              ("micro_batch", "B / M", "d"), ("temp_mib", "temp MiB", ".1f"),
                              ("temp_vs_small", f"x B={small}, M=1", ".2f"), ("compile_s", "compile s", ".0f")])
    for row in rows:
        common.emit(dict(info, **row))


if __name__ == "__main__":
    main()
