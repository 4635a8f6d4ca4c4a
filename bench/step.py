"""Compiled train-step benchmark: step time, images/s, analytic FLOPs and MFU for every registered objective.

Every objective in ``clus_jax.objectives.registry.names()`` is trained on the same architecture and random
batch with the trainer's own step (``clus_jax.train.experiment.build``), and the
candidates are timed in interleaved rounds, so the ratio of each objective to plain CLIP (the cost of its
loss, e.g. of clustering) comes from one run. MFU follows maxtext: analytic model FLOPs
(``clus_jax.train.flops.train_step_flops``: matmuls only, causal attention halved) over step time over peak.
The peak is the datasheet figure on GPU/TPU (``common.PEAK_TFLOPS``) and, on CPU, a float32 matmul timed
in the same rounds as the steps (the best round: a peak, so MFU is not flattered by a slow round).

  python bench/step.py --arch T                     # T architecture, all objectives
  python bench/step.py --arch S --steps 10
  python bench/step.py --config configs/clip.py --objectives clip
  python bench/step.py --arch T --malloc system     # glibc defaults instead of clus_jax's (common.MALLOC_ENVS)
  python bench/step.py --arch T --objectives clip --variant full_last_block:model.pooled_last_block=false
  python bench/step.py --quick                      # tiny model, to check the script

Prints a table and one JSON line per measurement.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

QUICK = dict(image_size=32, patch_size=8, vision_width=64, vision_layers=2, vision_heads=2, embed_dim=64,
             context_length=16, vocab_size=1000, text_width=64, text_layers=2, text_heads=2, mlp_ratio=4, batch_size=16)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    src = p.add_mutually_exclusive_group()
    src.add_argument("--arch", choices=sorted(common.ARCHS), help="built-in architecture (random data, AdamW)")
    src.add_argument("--config", help="config file[:args], as for the trainer; its model, batch and optimizer")
    p.add_argument("--steps", type=int, default=8, help="timed steps per objective (after warm-up)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per objective after compilation")
    p.add_argument("--objectives", default="all", help="comma-separated objective names, or 'all' registered")
    p.add_argument("--batch", type=int, default=0, help="override the global batch size")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None, help="override config.model.dtype")
    p.add_argument("--remat", action="store_true", help="set config.model.remat")
    p.add_argument("--num-prototypes", type=int, default=3000, help="prototypes for objectives that need a bank")
    p.add_argument("--devices", type=int, default=1,
                   help="devices the step runs on (on CPU: fake host devices sharing the same cores)")
    p.add_argument("--malloc", choices=sorted(common.MALLOC_ENVS), default="retain",
                   help="allocator setting for this process (see bench/common.py: MALLOC_ENVS)")
    p.add_argument("--variant", action="append", default=[], metavar="NAME:KEY=VALUE[,KEY=VALUE]",
                   help="also time the CLIP step with these config overrides (repeatable), as row 'clip[NAME]'")
    p.add_argument("--quick", action="store_true",
                   help="tiny model, two steps, CLIP and one other objective unless --objectives is given")
    return p.parse_args()


def base_config(args: argparse.Namespace):
    if args.quick:
        common.ARCHS["quick"] = QUICK
        config = common.arch_config("quick")
    elif args.config:
        config = common.file_config(args.config)
    else:
        config = common.arch_config(args.arch or "T")
    if args.batch:
        config.batch_size = args.batch
    if args.dtype:
        config.model.dtype = args.dtype
    if args.remat:
        config.model.remat = True
    return config


def objective_names(args: argparse.Namespace) -> list[str]:
    from clus_jax.objectives import registry

    known = registry.names()
    if args.objectives == "all" and args.quick:
        names = ["clip"] + [n for n in ("swap", "siglip") if n in known][:1]
    elif args.objectives == "all":
        names = known
    else:
        names = [n for n in args.objectives.split(",") if n]
        missing = [n for n in names if n not in known]
        if missing:
            print(f"skipping objectives that are not registered: {missing} (known: {known})")
            names = [n for n in names if n in known]
    # CLIP first: every other objective is reported relative to it.
    return sorted(names, key=lambda n: (n != "clip", n))


def main() -> None:
    args = parse_args()
    common.reexec_with_malloc(args.malloc)
    if args.devices > 1:
        common.set_host_devices(args.devices)
    import jax

    from clus_jax.config import base as config_base
    from clus_jax.train import flops as train_flops

    base = base_config(args)
    steps = 2 if args.quick else args.steps
    warmup = 1 if args.quick else args.warmup
    devices = jax.devices()[: args.devices]
    info = common.device_info()
    runners, rows = {}, []
    for name in objective_names(args):
        config = base.copy_and_resolve_references()
        common.configure_objective(config, name, args.num_prototypes)
        try:
            runners[name] = common.StepRunner(config, devices)
        except Exception as e:  # an objective that cannot run this config is reported, not fatal
            print(f"objective {name!r} skipped: {type(e).__name__}: {e}")
    if not runners:
        raise SystemExit("no objective could be built")
    for spec in args.variant:
        name, _, overrides = spec.partition(":")
        config = base.copy_and_resolve_references()
        common.configure_objective(config, "clip", args.num_prototypes)
        for item in filter(None, overrides.split(",")):
            key, _, value = (part.strip() for part in item.partition("="))
            config_base.set_dotted(config, key, config_base.parse_value(value, config_base.get_dotted(config, key)))
        runners[f"clip[{name}]"] = common.StepRunner(config, devices)

    candidates = dict(runners)
    peak_tflops = None
    dtype = str(base.model.dtype)
    if info["platform"] == "cpu":
        peak_fn, peak_flops = common.matmul_peak_fn(512 if args.quick else 2048)
        candidates["_peak"] = peak_fn
    else:
        peak_tflops = common.datasheet_peak_tflops(info["device_kind"], dtype)
    times = common.interleaved(candidates, rounds=steps, warmup=warmup)
    if "_peak" in times:
        peak_tflops = peak_flops / min(times.pop("_peak")) / 1e12
        peak_source = "float32 matmul, best of the same rounds"
    else:
        peak_source = f"datasheet {dtype}" if peak_tflops else "unknown device kind"
    peak_total = peak_tflops * len(devices) if peak_tflops else None

    clip_s = common.median(times["clip"]) if "clip" in times else None
    for name, runner in runners.items():
        cfg = runner.config
        t = common.median(times[name])
        model_flops = train_flops.train_step_flops(cfg)
        row = dict(
            bench="step", objective=name, batch=int(cfg.batch_size), devices=len(devices), dtype=str(cfg.model.dtype),
            remat=bool(cfg.model.remat), step_s=t, spread=common.spread(times[name]),
            images_per_s=int(cfg.batch_size) / t, gflops_per_step=model_flops / 1e9,
            model_tflops_per_s=model_flops / t / 1e12,
            mfu=train_flops.mfu(model_flops, t, peak_total * 1e12) if peak_total else None,
            vs_clip=t / clip_s if clip_s else None, compile_s=runner.compile_s,
            loss=float(runner.metrics["loss"]) if runner.metrics is not None else None,
            peak_tflops_per_device=peak_tflops, peak_source=peak_source, steps=steps, times=times[name],
        )
        rows.append(row)

    arch = "quick" if args.quick else (args.config or args.arch or "T")
    info["load_average_end"] = common.load_average()
    print(f"train step, {arch}: {info['device_kind']} x{len(devices)} ({info['host']}, {info['cpus']} CPUs), "
          f"jax {info['jax']}, {info['date']}, load average {info['load_average']} -> {info['load_average_end']}; "
          f"median of {steps} interleaved steps after {warmup} warm-up; "
          f"peak {peak_tflops * 1e3 if peak_tflops else float('nan'):.1f} GFLOP/s per device ({peak_source})")
    common.print_table(rows, [
        ("objective", "objective", ""), ("batch", "batch", "d"), ("step_s", "s/step", ".3f"),
        ("images_per_s", "img/s", ".1f"), ("gflops_per_step", "GFLOP/step", ".1f"),
        ("model_tflops_per_s", "TFLOP/s", ".4f"), ("mfu", "MFU", ".1%"), ("vs_clip", "x CLIP step", ".2f"),
        ("spread", "IQR/med", ".2f"),
    ])
    for row in rows:
        common.emit(dict(info, arch=arch, **row))


if __name__ == "__main__":
    main()
