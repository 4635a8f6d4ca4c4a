"""MLCD at scale: a million sharded class centres compiled for 8, 64 and 256 devices, and its step time next to CLIP.

Part ``scale`` (nothing is run): the mlcd train step with K = 1,000,000 centres of D = 512 (l = 8 labels,
sample rate r = 0.1, AdamW) is compiled for meshes of 8, 64 and 256 fake CPU devices at a fixed per-device
batch, one subprocess per mesh (the device count is fixed when XLA starts). The towers are the tests' tiny
ones, so the class head dominates. Reported per device: the centres' parameter bytes and their AdamW moments
(from the state's shardings), the [B_global, int(r * rows / n)] negative logits (shape read from the
optimized HLO: the benchmark fails if it is missing or if a [B_global, rows / n] block appears), the step's
temporaries (XLA:CPU's estimate) and all state. With the per-device batch fixed, B_global grows with n while
rows / n shrinks, so the logits stay flat and the centres shrink as 1 / n.

Part ``step``: the trainer's own step for ``mlcd`` and for ``clip`` on the same towers (architecture T of
bench/step.py: image 64, 6x192 ViT, embedding 256, batch 128), timed in interleaved rounds in one process.
MLCD runs the image tower only (its batches hold no text), so its step skips the text tower's forward and
backward and adds the [B, r K] head.

  python bench/mlcd.py                         # both parts
  python bench/mlcd.py --part scale --meshes 8,64,256 --per-device-batch 16
  python bench/mlcd.py --part step --steps 6 --num-classes 100000
  python bench/mlcd.py --quick
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
import memory  # noqa: E402  (compile_step, memory_stats, device_bytes: one copy of each)

MIB = 2**20


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--part", choices=("scale", "step", "all"), default="all")
    p.add_argument("--meshes", default="8,64,256", help="device counts of part 'scale'")
    p.add_argument("--per-device-batch", type=int, default=16, help="part 'scale'")
    p.add_argument("--scale-classes", type=int, default=1_000_000, help="K of part 'scale'")
    p.add_argument("--embed-dim", type=int, default=512, help="D of part 'scale'")
    p.add_argument("--num-classes", type=int, default=100_000, help="K of part 'step'")
    p.add_argument("--arch", default="T", help="architecture of part 'step' (bench/common.py ARCHS)")
    p.add_argument("--steps", type=int, default=6, help="timed rounds of part 'step'")
    p.add_argument("--quick", action="store_true", help="small sizes, to check the script")
    p.add_argument("--scale-worker", type=int, default=0, help=argparse.SUPPRESS)
    return p.parse_args()


def set_mlcd(config, num_classes: int) -> None:
    config.objectives = {"mlcd": 1.0}
    config.mlcd.update(dict(num_classes=num_classes, num_labels=8, sample_rate=0.1))


def with_cluster_labels(config, batch: dict[str, Any], seed: int = 0) -> dict[str, Any]:
    """``batch`` plus random distinct-per-row cluster labels when the config trains mlcd."""
    import numpy as np

    if "mlcd" in config.objectives:
        rng = np.random.default_rng(seed)
        k, l = int(config.mlcd.num_classes), int(config.mlcd.num_labels)
        batch["cluster_labels"] = np.stack([rng.choice(k, l, replace=False) for _ in range(len(batch["image"]))]
                                           ).astype(np.int32)
    return batch


# -------------------------------------------------------------------------------------------- part scale


def scale_config(args: argparse.Namespace, n: int):
    """The tests' tiny towers, embedding D, K centres, data parallel over ``n`` devices."""
    c = memory.tiny_config("clip", args.per_device_batch * n, 0)
    c.model.embed_dim = 64 if args.quick else args.embed_dim
    set_mlcd(c, 10_000 if args.quick else args.scale_classes)
    return c


def scale_worker(args: argparse.Namespace) -> None:
    """One mesh size, in a process started with that many fake devices; prints one JSON record."""
    import jax

    from clus_jax.objectives import partial_fc

    n = args.scale_worker
    config = scale_config(args, n)
    compiled, state, seconds = memory.compile_step(config, jax.devices()[:n])
    stats = memory.memory_stats(compiled)
    centres = state["params"]["mlcd"]["centers"]
    rows, d = centres.shape
    moments = [x for x in jax.tree.leaves(state["opt_state"]) if getattr(x, "shape", None) == centres.shape]
    b, local = int(config.batch_size), rows // n
    sampled = partial_fc.samples_per_shard(local, float(config.mlcd.sample_rate))
    shapes = set(re.findall(r"f32\[(\d+),(\d+)\]", compiled.as_text()))
    if (str(b), str(sampled)) not in shapes or (str(b), str(local)) in shapes:
        raise RuntimeError(f"{n} devices: expected logits f32[{b},{sampled}] and no f32[{b},{local}]")
    record = dict(
        bench="mlcd/scale", devices=n, num_classes=int(config.mlcd.num_classes), rows=rows, embed_dim=d,
        per_device_batch=args.per_device_batch, global_batch=b, centres_per_device=local, sampled_per_device=sampled,
        centre_bytes=memory.device_bytes(centres), moment_bytes=memory.device_bytes(moments),
        logit_bytes=b * sampled * 4, temp_bytes=stats["temp_bytes"],
        state_bytes=memory.device_bytes(state), compile_s=seconds, compiled=stats,
        centres_spec=str(centres.sharding.spec),
    )
    print("RECORD " + json.dumps(record), flush=True)


def scale_part(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for n in [8] if args.quick else [int(x) for x in args.meshes.split(",")]:
        env = dict(os.environ)
        flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "", env.get("XLA_FLAGS", ""))
        env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()
        env["JAX_PLATFORMS"] = "cpu"
        argv = [sys.executable, os.path.abspath(__file__), "--scale-worker", str(n), "--per-device-batch",
                str(args.per_device_batch), "--scale-classes", str(args.scale_classes), "--embed-dim",
                str(args.embed_dim)] + (["--quick"] if args.quick else [])
        result = subprocess.run(argv, env=env, capture_output=True, text=True)
        lines = [line for line in result.stdout.splitlines() if line.startswith("RECORD ")]
        if result.returncode or not lines:
            raise RuntimeError(f"scale worker for {n} devices failed:\n{result.stderr[-3000:]}")
        rows.append(json.loads(lines[-1][len("RECORD "):]))
    for row in rows:
        for key in ("centre_bytes", "moment_bytes", "logit_bytes", "temp_bytes", "state_bytes"):
            row[key.replace("_bytes", "_mib")] = row[key] / MIB
    first = rows[0]
    print(f"\nMLCD on paper: K = {first['num_classes']:,} centres ({first['rows']:,} rows) of D = {first['embed_dim']}, "
          f"l = 8, r = 0.1, per-device batch {first['per_device_batch']}, AdamW; per-device MiB (compiled for fake "
          "CPU devices, not run)")
    common.print_table(rows, [
        ("devices", "devices", "d"), ("global_batch", "global B", "d"), ("centres_per_device", "K/dev", "d"),
        ("sampled_per_device", "rK/dev", "d"), ("centre_mib", "centres", ".1f"), ("moment_mib", "Adam m+v", ".1f"),
        ("logit_mib", "logits", ".2f"), ("temp_mib", "temp", ".1f"), ("state_mib", "all state", ".1f"),
        ("compile_s", "compile s", ".0f"), ("centres_spec", "centres spec", ""),
    ])
    return rows


# --------------------------------------------------------------------------------------------- part step


def step_part(args: argparse.Namespace) -> list[dict[str, Any]]:
    import jax

    from clus_jax.objectives import registry

    random_batch = common.random_batch
    common.random_batch = lambda config, seed=0: with_cluster_labels(config, random_batch(config, seed), seed)
    arch = "quick" if args.quick else args.arch
    if args.quick:
        common.ARCHS["quick"] = dict(common.ARCHS["T"], image_size=32, vision_width=64, vision_layers=1,
                                     vision_heads=2, text_width=64, text_layers=1, text_heads=2, embed_dim=64,
                                     vocab_size=1000, context_length=16, batch_size=16)
    runners = {}
    for name in ("clip", "mlcd"):
        config = common.arch_config(arch, "clip")
        if name == "mlcd":
            set_mlcd(config, 1000 if args.quick else args.num_classes)
        runners[name] = common.StepRunner(config, jax.devices()[:1])
    times = common.interleaved(runners, rounds=2 if args.quick else args.steps, warmup=1)
    base = common.median(times["clip"])
    rows = []
    for name, ts in times.items():
        exp = runners[name].experiment
        rows.append(dict(bench="mlcd/step", objective=name, arch=arch, batch=int(exp.config.batch_size),
                         num_classes=int(exp.config.mlcd.num_classes) if name == "mlcd" else None,
                         towers="+".join(exp.modalities), s_per_step=common.median(ts), spread=common.spread(ts),
                         vs_clip=common.median(ts) / base, gflop=exp.train_step_flops() / 1e9,
                         compile_s=runners[name].compile_s, times=ts))
    assert registry.get("mlcd")  # the objective is registered in this build
    print(f"\nStep time, architecture {arch}, one device, {len(times['clip'])} interleaved rounds (median)")
    common.print_table(rows, [("objective", "objective", ""), ("towers", "towers run", ""),
                              ("num_classes", "K", "d"), ("s_per_step", "s/step", ".3f"), ("spread", "IQR/med", ".2f"),
                              ("gflop", "GFLOP/step", ".1f"), ("vs_clip", "x CLIP step", ".2f")])
    return rows


def main() -> None:
    args = parse_args()
    if args.scale_worker:
        scale_worker(args)
        return
    rows = []
    if args.part in ("scale", "all"):
        rows += scale_part(args)
    if args.part in ("step", "all"):
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
        rows += step_part(args)
    info = common.device_info() if args.part in ("step", "all") else dict(host=common.cpu_model())
    for row in rows:
        common.emit(dict(info, **row))


if __name__ == "__main__":
    main()
