"""Pre-flight memory plan: per-device bytes of a config's train step, computed without running a step.

    python -m clus_jax.plan --config configs/clip.py:size=B/16,batch=4096 \
        [--mesh data=8,fsdp=4,tensor=1] [--num-devices 32] [--device-memory-gb 95] [--config.KEY=VALUE ...]

Parameter, optimizer-state and objective-state bytes come from the abstract train state: each leaf's bytes
on one device follow from its sharding's shard shape. Activation/temporary memory comes from XLA: the
train step is lowered and compiled for the mesh and ``compiled.memory_analysis()`` gives the temporary,
argument and output sizes of the per-device SPMD program. Nothing is allocated or run.

``--num-devices N`` plans for N devices simulated on the host CPU (fake devices via XLA_FLAGS, set before
JAX starts). The state figures are exact for the target mesh; the temporary figure is the CPU compiler's
estimate of the target's, since fusion and layouts differ per backend. Without it, the plan uses the
devices this process sees, so running it on one host of the target gives the target's own compiler figures.

The total per device is state + batch + temporaries + non-donated outputs + generated code. With
``--device-memory-gb`` (GiB, i.e. 2**30 bytes) the command exits with status 3 and a one-line message
when the total does not fit; the launchers under ``launch/`` call it before starting a job.
"""
from __future__ import annotations

import json
import math
import os
import re
import sys
from typing import Any, Mapping

from clus_jax.common import cli

GIB = 2**30
EXIT_CONFIG_ERROR = 2
EXIT_DOES_NOT_FIT = 3


def _fake_cpu_devices(n: int) -> None:
    """Makes the host CPU platform expose ``n`` devices; must run before JAX initializes a backend."""
    flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "", os.environ.get("XLA_FLAGS", ""))
    os.environ["XLA_FLAGS"] = f"{flags.strip()} --xla_force_host_platform_device_count={n}".strip()
    os.environ["JAX_PLATFORMS"] = "cpu"


def _leaf_device_bytes(leaf) -> int:
    """Bytes one device holds of a ShapeDtypeStruct with a sharding (the largest shard)."""
    shape = tuple(leaf.shape)
    sharding = getattr(leaf, "sharding", None)
    if sharding is not None and shape:
        shape = tuple(sharding.shard_shape(shape))
    return int(math.prod(shape)) * leaf.dtype.itemsize


def _tree_bytes(tree) -> tuple[int, int]:
    """(global bytes, per-device bytes) of an abstract tree with shardings."""
    import jax

    leaves = jax.tree.leaves(tree)
    total = sum(int(math.prod(x.shape)) * x.dtype.itemsize for x in leaves)
    return total, sum(_leaf_device_bytes(x) for x in leaves)


def make_plan(config, mesh_override: Mapping[str, int] | None = None) -> dict[str, Any]:
    """Per-device memory plan of ``config``'s train step on the current JAX devices.

    Returns a flat dict of byte counts and sizes (see ``format_table`` for what each means), including the
    compiler's own ``compiled_*`` statistics for cross-checking the state figures.
    """
    import flax.linen as nn
    import jax

    from clus_jax.train.experiment import build
    from clus_jax.parallel import mesh as mesh_lib

    if mesh_override:
        config = config.copy_and_resolve_references()
        with config.unlocked():
            for axis, size in mesh_override.items():
                config.mesh[axis] = int(size)
    exp = build(config)
    mesh, rules, abstract_state = exp.mesh, exp.rules, exp.abstract_state
    batch_size = int(config.batch_size)
    abstract_batch = exp.abstract_batch(batch_size)

    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        compiled = exp.step.jitted.lower(abstract_state, abstract_batch).compile()
    stats = compiled.memory_analysis()

    groups = {
        "params": abstract_state["params"],
        "opt_state": abstract_state["opt_state"],
        "objective_states": abstract_state["objective_states"],
        "other_state": {k: v for k, v in abstract_state.items()
                        if k not in ("params", "opt_state", "objective_states")},
    }
    plan: dict[str, Any] = {}
    for name, tree in groups.items():
        total, per_device = _tree_bytes(tree)
        plan[f"{name}_bytes_global"] = total
        plan[f"{name}_bytes_per_device"] = per_device
    plan["param_count"] = sum(int(math.prod(x.shape)) for x in jax.tree.leaves(abstract_state["params"]))
    plan["batch_bytes_per_device"] = _tree_bytes(abstract_batch)[1]
    plan["state_bytes_per_device"] = sum(plan[f"{g}_bytes_per_device"] for g in groups)

    def stat(name: str) -> int:
        return int(getattr(stats, name, 0) or 0) if stats is not None else 0

    for name in ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
                 "temp_size_in_bytes", "generated_code_size_in_bytes"):
        plan[f"compiled_{name}"] = stat(name)
    plan["temp_bytes_per_device"] = plan["compiled_temp_size_in_bytes"]
    plan["unaliased_output_bytes_per_device"] = max(
        plan["compiled_output_size_in_bytes"] - plan["compiled_alias_size_in_bytes"], 0)
    plan["total_bytes_per_device"] = (
        plan["state_bytes_per_device"] + plan["batch_bytes_per_device"] + plan["temp_bytes_per_device"]
        + plan["unaliased_output_bytes_per_device"] + plan["compiled_generated_code_size_in_bytes"])

    dp = mesh_lib.data_parallel_size(mesh)
    plan.update(
        platform=jax.devices()[0].platform,
        num_devices=int(mesh.size),
        process_count=jax.process_count(),
        mesh={axis: int(size) for axis, size in mesh.shape.items()},
        global_batch=batch_size,
        per_device_batch=batch_size / dp,
        per_process_batch=batch_size // jax.process_count(),
    )
    return plan


def _gib(n: float) -> str:
    return f"{n / GIB:9.3f} GiB"


def format_table(plan: Mapping[str, Any], device_memory_gb: float | None = None) -> str:
    """Human-readable table of a plan (per device unless marked global)."""
    mesh = ",".join(f"{a}={s}" for a, s in plan["mesh"].items())
    lines = [
        f"memory plan on {plan['num_devices']} {plan['platform']} devices, mesh {mesh}",
        f"  batch: global {plan['global_batch']}, per device {plan['per_device_batch']:g}, "
        f"per process {plan['per_process_batch']}",
        f"  parameters: {plan['param_count']:,} ({_gib(plan['params_bytes_global']).strip()} global)",
        f"  {'per device':34s} {'bytes':>14s}",
    ]
    rows = [
        ("parameters", plan["params_bytes_per_device"]),
        ("optimizer state", plan["opt_state_bytes_per_device"]),
        ("objective state", plan["objective_states_bytes_per_device"]),
        ("step + rng", plan["other_state_bytes_per_device"]),
        ("input batch", plan["batch_bytes_per_device"]),
        ("activations + temporaries (XLA)", plan["temp_bytes_per_device"]),
        ("non-donated outputs (XLA)", plan["unaliased_output_bytes_per_device"]),
        ("generated code (XLA)", plan["compiled_generated_code_size_in_bytes"]),
    ]
    for label, value in rows:
        lines.append(f"  {label:34s} {value:14,d}  {_gib(value)}")
    lines.append(f"  {'total':34s} {plan['total_bytes_per_device']:14,d}  {_gib(plan['total_bytes_per_device'])}")
    if device_memory_gb:
        used = plan["total_bytes_per_device"] / (device_memory_gb * GIB)
        lines.append(f"  device memory {device_memory_gb:g} GiB: {100 * used:.1f}% used")
    lines.append(f"  (XLA argument size {plan['compiled_argument_size_in_bytes']:,} bytes vs state + batch "
                 f"{plan['state_bytes_per_device'] + plan['batch_bytes_per_device']:,})")
    return "\n".join(lines)


def check_fits(plan: Mapping[str, Any], device_memory_gb: float) -> str | None:
    """None when the plan fits in ``device_memory_gb`` GiB per device, else a one-line explanation."""
    total, limit = plan["total_bytes_per_device"], device_memory_gb * GIB
    if total <= limit:
        return None
    return (
        f"plan: {total / GIB:.2f} GiB per device does not fit in --device-memory-gb={device_memory_gb:g} "
        f"(state {plan['state_bytes_per_device'] / GIB:.2f}, activations/temporaries "
        f"{plan['temp_bytes_per_device'] / GIB:.2f} GiB); lower batch_size, raise mesh.fsdp, or set model.remat=True"
    )


def main(argv: list[str] | None = None) -> int:
    """CLI entry; returns the exit status (0 fits, 2 bad config, 3 does not fit)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = cli.ArgumentParser(
        prog="python -m clus_jax.plan", allow_abbrev=False,
        description="Per-device memory plan of a config's train step (nothing is run). "
                    "Other arguments (--config.KEY=VALUE, --workdir) are read like the trainer's.")
    parser.add_argument("--config", required=True, help="config file, optionally :ARG (as the trainer's --config)")
    parser.add_argument("--mesh", default="", help="mesh override, e.g. data=8,fsdp=4,tensor=1")
    parser.add_argument("--device-memory-gb", type=float, default=None,
                        help="fail (exit 3) when the total per device exceeds this many GiB")
    parser.add_argument("--num-devices", type=int, default=None,
                        help="plan for this many devices, simulated on the host CPU (an estimate of the target)")
    parser.add_argument("--json-only", action="store_true", help="print only the JSON line")
    args, rest = parser.parse_known_args(argv)
    if args.num_devices:
        _fake_cpu_devices(args.num_devices)  # before anything below imports and starts JAX
    return cli.run_command(lambda: _run(args, rest))


def _config(spec: str, rest: list[str]):
    """The config of ``--config spec`` with the ``--config.KEY=VALUE`` overrides of ``rest``, parsed as the
    trainer parses them; a missing file or key, or a bad value, is a ``UsageError`` naming it."""
    from absl import flags
    from ml_collections import config_flags

    from clus_jax.config.base import load_config

    try:  # the file and every key, named, before absl reads them
        config = load_config(spec)
    except (FileNotFoundError, KeyError, ValueError, SyntaxError) as e:
        raise cli.UsageError(f"--config {spec}: {cli.exception_text(e)}") from None
    cli.check_overrides(config, rest)
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "config file (optionally :ARG)", flag_values=fv, lock_config=False)
    flags.DEFINE_string("workdir", None, "ignored (accepted so launchers can pass the trainer's arguments)", flag_values=fv)
    try:
        fv(["clus_jax.plan", "--config", spec, *rest])
    except flags.Error as e:
        raise cli.UsageError(cli.error_text(e)) from None
    return fv.config


def _run(args, rest: list[str]) -> int:
    from clus_jax.common.errors import ConfigError
    from clus_jax.parallel.mesh import parse_mesh

    config = _config(args.config, rest)
    try:
        mesh_override = parse_mesh(args.mesh) if args.mesh else None
        plan = make_plan(config, mesh_override)
    except (ConfigError, ValueError) as e:
        raise cli.UsageError(cli.error_text(e)) from None
    if args.device_memory_gb:
        plan["device_memory_bytes"] = int(args.device_memory_gb * GIB)
    problem = check_fits(plan, args.device_memory_gb) if args.device_memory_gb else None
    plan["fits"] = problem is None
    if not args.json_only:
        print(format_table(plan, args.device_memory_gb))
    print(json.dumps(plan, sort_keys=True), flush=True)
    if problem:
        print(problem, file=sys.stderr)
        return EXIT_DOES_NOT_FIT
    return 0

if __name__ == "__main__":
    sys.exit(main())
