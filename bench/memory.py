"""Memory on paper: compiled per-device memory of losses and of a ViT-B/16 train step, nothing is run.

Part ``loss``: the train step of a tiny model (so the loss dominates) is compiled for a fixed per-device
batch on 1 device and on 8 fake CPU devices (global batch x8), for CLIP (unchunked and chunked),
SigLIP and the Clus swap objective. ``compiled.memory_analysis()`` temp bytes show which losses grow with
the global batch: unchunked CLIP holds [b_local, B] logits per device; chunked CLIP
(``config.clip.chunk_size``) and swap ([b_local, K] scores) do not.

Part ``scale``: the ViT-B/16 + 12-layer 512-wide text tower train step (CLIP, AdamW, FSDP over all
devices) is compiled for meshes of 8, 64 and 256 fake CPU devices, one subprocess per mesh (the device
count is fixed when XLA starts). Reported per device: parameter and optimizer bytes (from the state's
shardings), temporaries (activations, gradients, workspace: compiler's estimate for CPU), the total, and
bytes moved by all-gather / reduce-scatter / all-reduce per step (operand sizes in the optimized HLO).
Configurations above 16 GiB or 80 GiB per device are flagged, and the per-device batch that would fit is
extrapolated from the temporaries' per-example slope.

The compiled programs are XLA:CPU's: fusion, layouts and collective forms differ on GPU and TPU (for
example XLA:CPU keeps the FSDP gradient sync as an all-reduce followed by a slice, which XLA's GPU
pipeline rewrites into a reduce-scatter), so the temporaries and collective bytes are estimates for
those targets; the state figures are exact.

  python bench/memory.py                      # both parts
  python bench/memory.py --part loss
  python bench/memory.py --part scale --meshes 8,64,256 --per-device-batch 16,128 --dtype bfloat16
  python bench/memory.py --quick
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

GIB = 2**30
MIB = 2**20
LIMITS_GIB = (16, 80)
COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
_SHAPE = re.compile(r"\b(pred|s8|u8|s16|u16|f16|bf16|s32|u32|f32|s64|u64|f64|c64)\[([0-9,]*)\]")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
          "s64": 8, "u64": 8, "f64": 8, "c64": 8}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--part", choices=("loss", "scale", "all"), default="all")
    p.add_argument("--per-device-batch-loss", type=int, default=4096, help="per-device batch of part 'loss'")
    p.add_argument("--chunk-size", type=int, default=4096, help="config.clip.chunk_size of the chunked CLIP rows")
    p.add_argument("--num-prototypes", type=int, default=3000)
    p.add_argument("--meshes", default="8,64,256", help="device counts of part 'scale'")
    p.add_argument("--per-device-batch", default="16,128", help="comma-separated per-device batches of part 'scale'")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="compute dtype, part 'scale'")
    p.add_argument("--remat", action="store_true", help="config.model.remat for part 'scale'")
    p.add_argument("--quick", action="store_true", help="small sizes, to check the script")
    p.add_argument("--scale-worker", type=int, default=0, help=argparse.SUPPRESS)
    return p.parse_args()


# ------------------------------------------------------------------------------------------------ helpers


def tiny_config(objective: str, global_batch: int, num_prototypes: int, chunk_size: int = 0):
    """The tests' tiny two-tower model (width 64, 2 layers, embedding 32), data parallel over all devices."""
    from clus_jax.config import base as config_base

    c = config_base.base_config()
    c.batch_size = global_batch
    c.model.image.update(dict(size="mu", image_size=16, patch_size=4))
    c.model.text.update(dict(size="mu", context_length=8, vocab_size=64))
    c.model.embed_dim = 32
    c.data.source = "synthetic"
    c.evals.run = "none"
    common.configure_objective(c, objective, num_prototypes)
    if chunk_size:
        c[objective].chunk_size = chunk_size
    return c


def scale_config(per_device_batch: int, num_devices: int, dtype: str, remat: bool, quick: bool):
    """ViT-B/16 (224 px) + 12-layer, 512-wide text tower (77 tokens), embedding 512, CLIP, FSDP."""
    from clus_jax.config import base as config_base

    c = config_base.base_config()
    c.batch_size = per_device_batch * num_devices
    if quick:
        c.model.image.update(dict(size="mu", image_size=32, patch_size=8))
        c.model.text.update(dict(size="mu", context_length=16, vocab_size=1000))
        c.model.embed_dim = 64
    else:
        c.model.image.update(dict(size="B/16", image_size=224, patch_size=0))
        c.model.text.update(dict(size="base", context_length=77, vocab_size=49408))
        c.model.embed_dim = 512
    c.model.dtype = dtype
    c.model.remat = remat
    c.mesh.update(dict(data=1, fsdp=-1, tensor=1))
    c.data.source = "synthetic"
    c.evals.run = "none"
    return c


def compile_step(config, devices) -> tuple[Any, dict[str, Any], float]:
    """(compiled step, abstract state, compile seconds) for ``config`` on ``devices``, nothing allocated."""
    import flax.linen as nn
    import jax

    from clus_jax.train.experiment import build

    exp = build(config, devices)
    mesh, rules, state = exp.mesh, exp.rules, exp.abstract_state
    batch = exp.abstract_batch()
    t0 = time.perf_counter()
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        compiled = exp.step.jitted.lower(state, batch).compile()
    return compiled, state, time.perf_counter() - t0


def memory_stats(compiled) -> dict[str, int]:
    stats = compiled.memory_analysis()
    names = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes", "temp_size_in_bytes",
             "generated_code_size_in_bytes")
    return {n.replace("_size_in_bytes", "_bytes"): int(getattr(stats, n, 0) or 0) for n in names}


def device_bytes(tree) -> int:
    """Bytes one device holds of an abstract tree whose leaves carry shardings (largest shard per leaf)."""
    import jax

    total = 0
    for leaf in jax.tree.leaves(tree):
        shape = tuple(leaf.sharding.shard_shape(tuple(leaf.shape))) if leaf.shape else ()
        total += int(math.prod(shape)) * leaf.dtype.itemsize
    return total


_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%(?P<name>[\w.\-]+)\s*=\s*(?P<rest>.*)$")


def _split_instruction(rest: str) -> tuple[str, str, str]:
    """'TYPE op(args), attrs' -> (TYPE, op, args); TYPE may be a parenthesised tuple."""
    if rest.startswith("("):
        depth = 0
        for i, ch in enumerate(rest):
            depth += ch == "("
            depth -= ch == ")"
            if depth == 0:
                break
        type_text, rest = rest[: i + 1], rest[i + 1:].lstrip()
    else:
        type_text, _, rest = rest.partition(" ")
    op, _, rest = rest.partition("(")
    depth, args = 1, []
    for ch in rest:
        depth += ch == "("
        depth -= ch == ")"
        if depth == 0:
            break
        args.append(ch)
    return type_text, op.strip(), "".join(args)


def collective_bytes(hlo_text: str) -> dict[str, dict[str, int]]:
    """Per collective kind: count, operand bytes and result bytes of every collective in optimized HLO.

    Operand sizes come from the defining instruction of each operand in the same computation. Async
    pairs are counted once (at ``-start``); collectives inside loop bodies count once, not per trip.
    """
    out = {kind: {"count": 0, "operand_bytes": 0, "result_bytes": 0} for kind in COLLECTIVES}
    symbols: dict[str, str] = {}
    for line in hlo_text.splitlines():
        if line and not line[0].isspace():
            symbols = {}  # a new computation: names are local to it
            continue
        m = _INSTRUCTION.match(line)
        if not m:
            continue
        type_text, op, args = _split_instruction(m.group("rest"))
        symbols[m.group("name")] = type_text
        kind = op[: -len("-start")] if op.endswith("-start") else op
        if kind not in COLLECTIVES:
            continue
        operands = 0
        for arg in (a.strip() for a in args.split(",")):
            name = arg.split()[-1].lstrip("%") if arg else ""
            operands += _shape_bytes(arg) if _SHAPE.search(arg) else _shape_bytes(symbols.get(name, ""))
        result = _shape_bytes(type_text)
        if op.endswith("-start") and kind in ("all-gather", "collective-permute"):
            result = max(result - operands, 0)  # the -start result tuple repeats the operand
        out[kind]["count"] += 1
        out[kind]["operand_bytes"] += operands
        out[kind]["result_bytes"] += result
    return out


def _shape_bytes(text: str) -> int:
    return sum(_BYTES[t] * int(math.prod(int(d) for d in dims.split(",") if d)) for t, dims in _SHAPE.findall(text))


# --------------------------------------------------------------------------------------------- part loss


def loss_part(args: argparse.Namespace) -> list[dict[str, Any]]:
    import jax

    from clus_jax.objectives import registry

    per_device = 64 if args.quick else args.per_device_batch_loss
    chunk = min(args.chunk_size, per_device)
    protos = 100 if args.quick else args.num_prototypes
    devices = jax.devices()
    layouts = [(1, per_device), (8, 8 * per_device)]
    cases = [("clip", 0), ("clip", chunk), ("siglip", 0), ("siglip", chunk), ("swap", 0)]
    if args.quick:
        cases = [("clip", chunk)]
    cases = [c for c in cases if c[0] in registry.names()]
    rows = []
    for objective, chunk_size in cases:
        for n, global_batch in layouts:
            config = tiny_config(objective, global_batch, protos, chunk_size)
            compiled, state, seconds = compile_step(config, devices[:n])
            stats = memory_stats(compiled)
            rows.append(dict(bench="memory/loss", objective=objective, chunk_size=chunk_size, devices=n,
                             global_batch=global_batch, per_device_batch=global_batch // n,
                             num_prototypes=protos if objective == "swap" else None,
                             temp_mib=stats["temp_bytes"] / MIB, compile_s=seconds, **stats))
    for row in rows:  # growth from 1 to 8 devices at the same per-device batch
        base = next(r for r in rows if r["objective"] == row["objective"] and r["chunk_size"] == row["chunk_size"]
                    and r["devices"] == 1)
        row["temp_vs_1_device"] = row["temp_bytes"] / max(base["temp_bytes"], 1)
    print(f"\nLoss memory: tiny model train step, per-device batch {per_device}, compiled temp bytes per device "
          f"(XLA:CPU memory_analysis); 8 devices = global batch x8")
    common.print_table(rows, [("objective", "objective", ""), ("chunk_size", "chunk", "d"), ("devices", "devices", "d"),
                              ("global_batch", "global B", "d"), ("per_device_batch", "B/device", "d"),
                              ("temp_mib", "temp MiB", ".1f"), ("temp_vs_1_device", "x 1 device", ".2f")])
    return rows


# -------------------------------------------------------------------------------------------- part scale


def scale_worker(args: argparse.Namespace) -> None:
    """One mesh size, in a process started with that many fake devices; prints one JSON record."""
    import jax

    n, per_device_batch = args.scale_worker, int(args.per_device_batch)
    config = scale_config(per_device_batch, n, args.dtype, args.remat, args.quick)
    compiled, state, seconds = compile_step(config, jax.devices()[:n])
    stats = memory_stats(compiled)
    params = device_bytes(state["params"])
    opt = device_bytes(state["opt_state"])
    other = device_bytes({k: v for k, v in state.items() if k not in ("params", "opt_state")})
    batch = per_device_batch * (int(config.model.image.image_size) ** 2 * 3 + 4 * int(config.model.text.context_length))
    total = params + opt + other + batch + stats["temp_bytes"] + max(stats["output_bytes"] - stats["alias_bytes"], 0)
    collectives = collective_bytes(compiled.as_text())
    record = dict(
        bench="memory/scale", devices=n, mesh=dict(data=1, fsdp=n, tensor=1), per_device_batch=per_device_batch,
        global_batch=int(config.batch_size), dtype=args.dtype, remat=args.remat,
        param_count=sum(int(math.prod(x.shape)) for x in jax.tree.leaves(state["params"])),
        param_bytes=params, opt_bytes=opt, other_state_bytes=other, batch_bytes=batch,
        temp_bytes=stats["temp_bytes"], total_bytes=total, compile_s=seconds, compiled=stats,
        collectives=collectives,
        collective_operand_bytes=sum(c["operand_bytes"] for c in collectives.values()),
    )
    print("RECORD " + json.dumps(record), flush=True)


def scale_part(args: argparse.Namespace) -> list[dict[str, Any]]:
    meshes = [8] if args.quick else [int(n) for n in args.meshes.split(",")]
    batches = [16] if args.quick else [int(b) for b in str(args.per_device_batch).split(",")]
    rows = []
    for n, b in ((n, b) for b in batches for n in meshes):
        env = dict(os.environ)
        flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "", env.get("XLA_FLAGS", ""))
        env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()
        env["JAX_PLATFORMS"] = "cpu"
        argv = [sys.executable, os.path.abspath(__file__), "--scale-worker", str(n),
                "--per-device-batch", str(b), "--dtype", args.dtype]
        argv += ["--remat"] if args.remat else []
        argv += ["--quick"] if args.quick else []
        result = subprocess.run(argv, env=env, capture_output=True, text=True)
        lines = [line for line in result.stdout.splitlines() if line.startswith("RECORD ")]
        if result.returncode or not lines:
            raise RuntimeError(f"scale worker for {n} devices failed:\n{result.stderr[-3000:]}")
        rows.append(json.loads(lines[-1][len("RECORD "):]))
    for row in rows:
        per_example = row["temp_bytes"] / row["per_device_batch"]
        fixed = row["total_bytes"] - row["temp_bytes"]
        for limit in LIMITS_GIB:
            row[f"fits_{limit}gib"] = row["total_bytes"] <= limit * GIB
            row[f"max_batch_{limit}gib"] = max(int((limit * GIB - fixed) // per_example), 0)
        for key in ("param_bytes", "opt_bytes", "temp_bytes", "total_bytes", "collective_operand_bytes"):
            row[key.replace("_bytes", "_mib")] = row[key] / MIB
        for kind in ("all-gather", "reduce-scatter", "all-reduce"):
            row[f"{kind}_mib"] = row["collectives"][kind]["operand_bytes"] / MIB
        row["flag"] = ", ".join(f"> {limit} GiB" for limit in LIMITS_GIB if not row[f"fits_{limit}gib"]) or "fits 16 GiB"
    name = "tiny model (--quick)" if args.quick else "ViT-B/16 + text 12x512"
    print(f"\nScale on paper: {name} CLIP train step, FSDP, {args.dtype}"
          f"{', remat' if args.remat else ''}; per-device MiB (compiled for fake CPU devices, not run)")
    common.print_table(rows, [
        ("devices", "devices", "d"), ("per_device_batch", "B/device", "d"), ("global_batch", "global B", "d"),
        ("param_mib", "params", ".1f"),
        ("opt_mib", "optimizer", ".1f"), ("temp_mib", "temp/activ.", ".1f"), ("total_mib", "total", ".1f"),
        ("all-gather_mib", "all-gather", ".1f"), ("reduce-scatter_mib", "reduce-scatter", ".1f"),
        ("all-reduce_mib", "all-reduce", ".1f"), ("max_batch_16gib", "max B/dev 16G", "d"),
        ("max_batch_80gib", "max B/dev 80G", "d"), ("compile_s", "compile s", ".0f"), ("flag", "", ""),
    ])
    return rows


def main() -> None:
    args = parse_args()
    if args.scale_worker:
        scale_worker(args)
        return
    rows = []
    if args.part in ("loss", "all"):
        common.set_host_devices(8)
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
        rows += loss_part(args)
    if args.part in ("scale", "all"):
        rows += scale_part(args)
    info = common.device_info() if args.part in ("loss", "all") else dict(host=common.cpu_model())
    for row in rows:
        common.emit(dict(info, **row))


if __name__ == "__main__":
    main()
