"""Device mesh from config: ``config.mesh = {'data': -1, 'fsdp': 1, 'tensor': 1}`` (one -1 = the rest)."""
from __future__ import annotations

import re
from typing import Mapping, Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh

MESH_AXES = ("data", "fsdp", "tensor")
# Axes that split the batch: data parallelism and FSDP both see different examples.
BATCH_AXES = ("data", "fsdp")


class MeshError(ValueError):
    pass


def resolve_mesh_shape(mesh_config: Mapping[str, int], num_devices: int) -> dict[str, int]:
    """Fills in the one -1 axis and checks the product equals the device count."""
    unknown = set(mesh_config) - set(MESH_AXES)
    if unknown:
        raise MeshError(f"config.mesh has unknown axes {sorted(unknown)}; allowed: {list(MESH_AXES)}")
    shape = {axis: int(mesh_config.get(axis, 1)) for axis in MESH_AXES}
    free = [a for a, s in shape.items() if s == -1]
    if len(free) > 1:
        raise MeshError(f"config.mesh: at most one axis may be -1, got {free}")
    for axis, size in shape.items():
        if size == 0 or size < -1:
            raise MeshError(f"config.mesh.{axis}={size} must be a positive size or -1")
    fixed = int(np.prod([s for s in shape.values() if s != -1]))
    if free:
        if num_devices % fixed:
            raise MeshError(f"config.mesh: fixed axes use {fixed} devices, which does not divide the {num_devices} available")
        shape[free[0]] = num_devices // fixed
    total = int(np.prod(list(shape.values())))
    if total > num_devices:
        raise MeshError(f"config.mesh {shape} needs {total} devices but only {num_devices} are available")
    if total != num_devices:
        raise MeshError(f"config.mesh {shape} uses {total} of {num_devices} devices; set one axis to -1 or match the count")
    return shape


def create_mesh(mesh_config: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Builds a ('data', 'fsdp', 'tensor') mesh, topology-aware where the platform supports it."""
    devices = list(devices) if devices is not None else jax.devices()
    shape = resolve_mesh_shape(mesh_config, len(devices))
    dims = tuple(shape[a] for a in MESH_AXES)
    try:
        grid = mesh_utils.create_device_mesh(dims, devices=devices)
    except Exception:  # CPU / odd topologies: plain row-major order is always valid
        grid = np.asarray(devices).reshape(dims)
    return Mesh(grid, MESH_AXES)


def data_parallel_size(mesh: Mesh) -> int:
    return int(np.prod([mesh.shape[a] for a in BATCH_AXES]))


def parse_mesh(spec: str) -> dict[str, int]:
    """'data=8,fsdp=4,tensor=1' -> {'data': 8, 'fsdp': 4, 'tensor': 1} (-1 allowed for one axis)."""
    out: dict[str, int] = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, sep, value = item.partition("=")
        if not sep or not re.fullmatch(r"-?\d+", value.strip()):
            raise ValueError(f"--mesh expects AXIS=SIZE[,AXIS=SIZE...], got {spec!r}")
        out[name.strip()] = int(value)
    return out
