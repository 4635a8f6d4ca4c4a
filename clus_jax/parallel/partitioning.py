"""Logical axis rules -> PartitionSpecs -> NamedShardings (maxtext-style, one rule table in the config).

Parameters and objective state carry logical names through ``flax.linen.LogicallyPartitioned`` boxes. A
rule maps a logical name to one mesh axis, a tuple of axes, or None. A mesh axis is used at most once per
array, and a dimension that the chosen axes do not divide is left replicated rather than failing: heads=3
on tensor=4 still runs (replicated), it just is not tensor-parallel.
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

Rules = Sequence[tuple[str, Any]]

DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    # parameters
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("vocab", "tensor"),
    ("patch", None),
    ("proj", None),
    ("prototypes", "tensor"),
    ("classes", ("data", "fsdp", "tensor")),  # MLCD's class centres: Partial-FC, split over every device
    # activations and per-example state
    ("batch", ("data", "fsdp")),
    ("act_batch", ("data", "fsdp")),
    ("act_seq", None),
    ("act_embed", None),
    ("act_mlp", "tensor"),
    ("act_heads", "tensor"),
)


def _as_tuple(x: Any) -> tuple[str, ...]:
    if x is None:
        return ()
    return (x,) if isinstance(x, str) else tuple(x)


def logical_to_spec(names: Sequence[str | None], shape: Sequence[int], rules: Rules, mesh: Mesh) -> P:
    """Resolves one array's logical names to a PartitionSpec, skipping reused or non-dividing axes."""
    table = {name: _as_tuple(axes) for name, axes in rules}
    used: set[str] = set()
    spec = []
    for name, dim in zip(names, shape):
        chosen: list[str] = []
        for axis in table.get(name, ()) if name is not None else ():
            if axis in used or axis not in mesh.shape or mesh.shape[axis] == 1:
                continue
            size = int(np.prod([mesh.shape[a] for a in chosen + [axis]]))
            if dim % size == 0:
                chosen.append(axis)
        used.update(chosen)
        spec.append(None if not chosen else chosen[0] if len(chosen) == 1 else tuple(chosen))
    while spec and spec[-1] is None:
        spec.pop()
    return P(*spec)


def is_box(x: Any) -> bool:
    return isinstance(x, nn.LogicallyPartitioned)


def shardings_for(boxed_tree: Any, mesh: Mesh, rules: Rules) -> Any:
    """NamedSharding for every leaf of a (possibly boxed, possibly abstract) tree; unboxed leaves replicate."""

    def one(leaf: Any) -> NamedSharding:
        if is_box(leaf):
            return NamedSharding(mesh, logical_to_spec(leaf.names, leaf.value.shape, rules, mesh))
        return NamedSharding(mesh, P())

    return jax.tree.map(one, boxed_tree, is_leaf=is_box)


def unbox(tree: Any) -> Any:
    return nn.meta.unbox(tree)


def batch_sharding(mesh: Mesh, rules: Rules, ndim: int = 1) -> NamedSharding:
    """Sharding of a batch-major array: axis 0 split like the logical 'batch' axis."""
    axes = dict((n, _as_tuple(a)) for n, a in rules).get("batch", ())
    axes = tuple(a for a in axes if a in mesh.shape)
    return NamedSharding(mesh, P(axes if axes else None, *([None] * (ndim - 1))))


def batch_axes(mesh: Mesh, rules: Rules) -> tuple[str, ...]:
    """Mesh axes the batch is split over (for shard_map islands inside objectives)."""
    axes = dict((n, _as_tuple(a)) for n, a in rules).get("batch", ())
    return tuple(a for a in axes if a in mesh.shape)
