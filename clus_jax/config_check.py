"""Validates a config before anything compiles; every message names the offending key."""
from __future__ import annotations

import numbers

import ml_collections

from clus_jax.models import sizes, towers
from clus_jax.objectives import registry
from clus_jax.objectives.registry import ConfigError
from clus_jax.parallel import mesh as mesh_lib


def _positive_int(config: ml_collections.ConfigDict, key: str, allow_zero: bool = False) -> int:
    value = config[key]
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < (0 if allow_zero else 1):
        raise ConfigError(f"config.{key}={value!r} must be an integer {'>= 0' if allow_zero else '> 0'}")
    return int(value)


def validate(config: ml_collections.ConfigDict, num_devices: int, process_count: int = 1) -> dict[str, int]:
    """Raises ConfigError on the first problem; returns the resolved mesh shape."""
    batch = _positive_int(config, "batch_size")
    _positive_int(config, "total_steps")
    for key in ("log_every", "eval_every", "checkpoint_every"):
        _positive_int(config, key, allow_zero=True)

    try:
        mesh_shape = mesh_lib.resolve_mesh_shape(dict(config.mesh), num_devices)
    except mesh_lib.MeshError as e:
        raise ConfigError(str(e)) from None
    dp = mesh_shape["data"] * mesh_shape["fsdp"]
    if batch % dp:
        raise ConfigError(
            f"config.batch_size={batch} is not divisible by the data-parallel size {dp} "
            f"(config.mesh.data={mesh_shape['data']} x config.mesh.fsdp={mesh_shape['fsdp']})"
        )
    if batch % process_count:
        raise ConfigError(f"config.batch_size={batch} is not divisible by the process count {process_count}")

    m = config.model
    if m.dtype not in towers.DTYPES:
        raise ConfigError(f"config.model.dtype={m.dtype!r} must be one of {sorted(towers.DTYPES)}")
    try:
        isize = sizes.vit_size(m.image.size)
    except KeyError as e:
        raise ConfigError(f"config.model.image.size: {e.args[0]}") from None
    try:
        tsize = sizes.text_size(m.text.size)
    except KeyError as e:
        raise ConfigError(f"config.model.text.size: {e.args[0]}") from None
    patch = m.image.get("patch_size") or isize.patch_size
    if not patch:
        raise ConfigError(f"config.model.image.patch_size is required for size {m.image.size!r} (or use e.g. 'B/16')")
    if m.image.image_size % patch:
        raise ConfigError(f"config.model.image.image_size={m.image.image_size} is not divisible by patch_size={patch}")
    for tower, size in (("image", isize), ("text", tsize)):
        width = m[tower].get("width") or size.width
        heads = m[tower].get("heads") or size.heads
        if width % heads:
            raise ConfigError(f"config.model.{tower}: width {width} is not divisible by heads {heads}")
    if m.image.get("pooling", "cls") not in ("cls", "gap", "map"):
        raise ConfigError(f"config.model.image.pooling={m.image.pooling!r} must be 'cls', 'gap' or 'map'")
    if m.text.get("pooling", "eot") not in ("eot", "mean"):
        raise ConfigError(f"config.model.text.pooling={m.text.pooling!r} must be 'eot' or 'mean'")

    if not config.objectives:
        raise ConfigError("config.objectives is empty; e.g. {'clip': 1.0}")
    for name, weight in dict(config.objectives).items():
        objective = registry.get(name)
        if not isinstance(weight, numbers.Real) or weight < 0:
            raise ConfigError(f"config.objectives.{name}={weight!r} must be a weight >= 0")
        objective.validate(config)

    o = config.optim
    if not o.lr > 0:
        raise ConfigError(f"config.optim.lr={o.lr!r} must be > 0")
    if o.warmup_steps < 0:
        raise ConfigError(f"config.optim.warmup_steps={o.warmup_steps!r} must be >= 0")
    if o.get("schedule", "cosine") not in ("cosine", "constant"):
        raise ConfigError(f"config.optim.schedule={o.schedule!r} must be 'cosine' or 'constant'")
    from clus_jax.data.pipeline import resolve_data_config

    try:
        resolve_data_config(config.data)
    except ValueError as e:
        raise ConfigError(f"config.data: {e}") from None
    if config.evals.sets not in ("embedded", "none"):
        raise ConfigError(f"config.evals.sets={config.evals.sets!r} must be 'embedded' or 'none'")
    return mesh_shape
