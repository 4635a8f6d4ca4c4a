"""clus_jax against open_clip: the same CLIP train step (architecture, batch, AdamW, grad clipping, thread
count), timed in interleaved rounds from one driver, reported as clus_jax images/s / open_clip images/s.

Each side runs in its own worker process pinned to the same ``--threads`` CPUs (``sched_setaffinity`` plus
``torch.set_num_threads``), and the driver asks them for one timed step at a time in turn, so load from
elsewhere on the host hits both alike in time. It does not hit them alike in effect: PyTorch's OpenMP
threads wait for each other at every parallel region, so when another process takes a core, open_clip
slows down several times more than XLA's work-stealing thread pool and the ratio rises. Compare ratios
only from runs on an otherwise idle host (the load average is printed and recorded).

open_clip needs PyTorch, which lives in a separate virtual environment (CPU wheel)::

  python -m venv /tmp/ocbench
  /tmp/ocbench/bin/pip install torch==2.13.0 ftfy regex numpy
  /tmp/ocbench/bin/pip install --no-deps open-clip-torch==3.3.0

open_clip's package ``__init__`` imports torchvision (for transforms only), which the torch CPU wheel
above does not ship with; the worker imports ``open_clip.model`` and ``open_clip.loss`` directly and stubs
the one torchvision symbol they reference. Then, from the repository root with the clus_jax environment::

  python bench/vs_open_clip.py --torch-python /tmp/ocbench/bin/python            # T and S, float32
  python bench/vs_open_clip.py --arch T --rounds 5 --quick                       # smoke test
  OPEN_CLIP_PYTHON=/tmp/ocbench/bin/python python bench/vs_open_clip.py --precision bf16
  python bench/vs_open_clip.py --malloc retain          # only clus_jax's allocator setting, on both sides

``--precision bf16`` runs clus_jax with ``model.dtype=bfloat16`` and open_clip under
``torch.autocast('cpu', torch.bfloat16)`` (parameters and optimizer in float32 on both sides).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import types

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
import host  # noqa: E402

QUICK_ARCH = dict(image_size=32, patch_size=8, vision_width=64, vision_layers=2, vision_heads=1, embed_dim=64,
                  context_length=16, vocab_size=1000, text_width=64, text_layers=2, text_heads=2, mlp_ratio=4,
                  batch_size=16)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", default="T,S", help="comma-separated architectures from bench/common.py")
    p.add_argument("--rounds", type=int, default=15, help="timed interleaved rounds (one step per side each)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per side after compilation")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--torch-python", default=os.environ.get("OPEN_CLIP_PYTHON", "/tmp/ocbench/bin/python"),
                   help="python of the PyTorch + open_clip environment (or $OPEN_CLIP_PYTHON)")
    p.add_argument("--malloc", default="system,retain",
                   help="comma-separated allocator settings, each applied to both frameworks' workers and timed in "
                        f"the same rounds: {', '.join(sorted(common.MALLOC_ENVS))} (see bench/common.py)")
    p.add_argument("--quick", action="store_true", help="a tiny architecture and few rounds, to check the script")
    p.add_argument("--worker", choices=("jax", "torch"), help=argparse.SUPPRESS)
    return p.parse_args()


def arch_dims(name: str) -> dict:
    return dict(QUICK_ARCH) if name == "quick" else dict(common.ARCHS[name])


def pin_threads(threads: int) -> None:
    """Restricts this process to ``threads`` CPUs (XLA sizes its thread pool from the affinity mask)."""
    if hasattr(os, "sched_setaffinity"):
        cpus = sorted(os.sched_getaffinity(0))[:threads]
        os.sched_setaffinity(0, cpus)
    os.environ["OMP_NUM_THREADS"] = str(threads)


# ----------------------------------------------------------------------------------------------- workers


def jax_worker(arch: str, precision: str, warmup: int) -> None:
    import jax

    a = arch_dims(arch)
    if arch == "quick":
        common.ARCHS["quick"] = a
    config = common.arch_config(arch, dtype="bfloat16" if precision == "bf16" else "float32")
    runner = common.StepRunner(config, jax.devices()[:1])
    for _ in range(warmup):
        runner()
    common.serve(runner, dict(framework="clus_jax", jax=jax.__version__, compile_s=runner.compile_s,
                              threads=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None))


def _import_open_clip():
    """open_clip's model and loss modules without the package ``__init__`` (which needs torchvision)."""
    import importlib.util

    spec = importlib.util.find_spec("open_clip")
    if spec is None:
        raise SystemExit("open_clip is not installed in this environment (see the module docstring)")
    if "torchvision" not in sys.modules:
        tv, ops, misc = (types.ModuleType(n) for n in ("torchvision", "torchvision.ops", "torchvision.ops.misc"))

        class FrozenBatchNorm2d:  # referenced by open_clip.utils, used only by ResNet towers
            def __init__(self, *args, **kwargs):
                raise NotImplementedError("torchvision is not available")

        misc.FrozenBatchNorm2d = FrozenBatchNorm2d
        tv.ops, ops.misc = ops, misc
        sys.modules.update({"torchvision": tv, "torchvision.ops": ops, "torchvision.ops.misc": misc})
    package = types.ModuleType("open_clip")
    package.__path__ = list(spec.submodule_search_locations)
    sys.modules["open_clip"] = package
    import open_clip.loss
    import open_clip.model

    return open_clip.model, open_clip.loss


def torch_worker(arch: str, precision: str, warmup: int, threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    model_lib, loss_lib = _import_open_clip()
    a = arch_dims(arch)
    torch.manual_seed(0)
    vision_cfg = dict(layers=a["vision_layers"], width=a["vision_width"], patch_size=a["patch_size"],
                      image_size=a["image_size"], head_width=a["vision_width"] // a["vision_heads"],
                      mlp_ratio=a["mlp_ratio"])
    text_cfg = dict(context_length=a["context_length"], vocab_size=a["vocab_size"], width=a["text_width"],
                    heads=a["text_heads"], layers=a["text_layers"], mlp_ratio=a["mlp_ratio"])
    model = model_lib.CLIP(a["embed_dim"], vision_cfg, text_cfg)
    model.train()
    loss_fn = loss_lib.ClipLoss()
    # open_clip's main.py: no weight decay on gains, biases, logit scale and embeddings.
    named = list(model.named_parameters())
    exclude = lambda n, p: p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n
    groups = [{"params": [p for n, p in named if exclude(n, p)], "weight_decay": 0.0},
              {"params": [p for n, p in named if not exclude(n, p)], "weight_decay": 0.1}]
    opt = torch.optim.AdamW(groups, lr=1e-3, betas=(0.9, 0.98), eps=1e-6)
    b = a["batch_size"]
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(b, 3, a["image_size"], a["image_size"], generator=gen)
    text = torch.randint(1, a["vocab_size"], (b, a["context_length"]), generator=gen)
    autocast = precision == "bf16"

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            image_features, text_features, logit_scale = model(images, text)
            loss = loss_fn(image_features, text_features, logit_scale)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))

    for _ in range(warmup):
        step()
    common.serve(step, dict(framework="open_clip", torch=torch.__version__, threads=torch.get_num_threads(),
                            params=sum(p.numel() for p in model.parameters())))


# ------------------------------------------------------------------------------------------------ driver


def main() -> None:
    args = parse_args()
    if args.worker:
        pin_threads(args.threads)
        arch = args.arch
        if args.worker == "jax":
            jax_worker(arch, args.precision, args.warmup)
        else:
            torch_worker(arch, args.precision, args.warmup, args.threads)
        return

    archs = ["quick"] if args.quick else args.arch.split(",")
    rounds = min(args.rounds, 3) if args.quick else args.rounds
    warmup = 1 if args.quick else args.warmup
    if not os.path.exists(args.torch_python):
        raise SystemExit(f"no python at {args.torch_python}: set up the open_clip environment (see --help)")
    script = os.path.abspath(__file__)
    base = ["--threads", str(args.threads), "--precision", args.precision, "--warmup", str(warmup)]
    # The processor family and its matmul rate, measured before the workers start: a ratio from one family
    # says nothing about another (AVX-512 and AMX hosts run XLA's and oneDNN's kernels differently).
    host_record = host.describe()
    load_start = common.load_average()
    mallocs = [m for m in args.malloc.split(",") if m]
    if args.quick:
        mallocs = mallocs[-1:]
    workers = {}
    for malloc in mallocs:
        env = dict(common.malloc_env(malloc), CLUS_JAX_BENCH_MALLOC=malloc)
        for arch in archs:
            workers[(arch, malloc, "clus_jax")] = common.Worker(
                [sys.executable, script, "--worker", "jax", "--arch", arch, *base], env)
            workers[(arch, malloc, "open_clip")] = common.Worker(
                [args.torch_python, script, "--worker", "torch", "--arch", arch, *base], env)
    try:
        times = {key: [] for key in workers}
        for _ in range(rounds):
            for key, worker in workers.items():
                times[key] += worker.run(1)
    finally:
        for worker in workers.values():
            worker.close()

    import jax

    info = dict(common.device_info(), threads=args.threads, precision=args.precision, rounds=rounds,
                load_average_start=load_start, xla_matmul_gflops=host_record["xla_matmul_gflops"])
    torch_version = next(w.info["torch"] for (_, _, fw), w in workers.items() if fw == "open_clip")
    print(f"{info['host']} ({info['cpus']} CPUs), {args.threads} threads per side, {args.precision}, "
          f"{rounds} interleaved rounds, jax {jax.__version__}, torch {torch_version}, {info['date']}, "
          f"load average {load_start} -> {info['load_average']}")
    print("host:", host.summary(host_record))
    rows = []
    for arch in archs:
        batch = arch_dims(arch)["batch_size"]
        for malloc in mallocs:
            row = dict(arch=arch, malloc=malloc, batch=batch)
            for fw in ("clus_jax", "open_clip"):
                t = times[(arch, malloc, fw)]
                row[f"{fw}_step_s"] = common.median(t)
                row[f"{fw}_img_s"] = batch / common.median(t)
                row[f"{fw}_spread"] = common.spread(t)
                row[f"{fw}_times"] = t
            row["ratio"] = row["clus_jax_img_s"] / row["open_clip_img_s"]
            default = (arch, mallocs[0], "clus_jax")
            row["clus_jax_vs_first_malloc"] = common.median(times[default]) / row["clus_jax_step_s"]
            rows.append(row)
    common.print_table(rows, [("arch", "arch", ""), ("malloc", "malloc", ""), ("batch", "batch", "d"),
                              ("clus_jax_step_s", "clus_jax s/step", ".3f"), ("clus_jax_img_s", "img/s", ".1f"),
                              ("open_clip_step_s", "open_clip s/step", ".3f"), ("open_clip_img_s", "img/s", ".1f"),
                              ("ratio", "clus_jax/open_clip", ".2f"),
                              ("clus_jax_vs_first_malloc", f"clus_jax x {mallocs[0]}", ".2f")])
    for row in rows:
        common.emit(dict(info, bench="vs_open_clip", **row))


if __name__ == "__main__":
    main()
