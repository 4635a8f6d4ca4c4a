"""Global arrays from per-process data, and small multi-process helpers."""
from __future__ import annotations

from typing import Mapping

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


def make_global_batch(local: Mapping[str, np.ndarray], sharding_for_ndim) -> dict[str, jax.Array]:
    """Assembles the global batch from this process's rows; each process passes a disjoint share.

    ``sharding_for_ndim(ndim)`` returns the NamedSharding of a batch-major array of that rank.
    """
    out = {}
    for key, value in local.items():
        value = np.asarray(value)
        out[key] = jax.make_array_from_process_local_data(sharding_for_ndim(value.ndim), value)
    return out


def process_slice(n: int) -> slice:
    """This process's contiguous share of n rows (n divisible by the process count)."""
    count, index = jax.process_count(), jax.process_index()
    per = n // count
    return slice(index * per, (index + 1) * per)


def to_host(x: jax.Array) -> np.ndarray:
    """Full value of a (possibly multi-process sharded) array on every host."""
    if jax.process_count() == 1 or x.is_fully_addressable:
        return np.asarray(jax.device_get(x))
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())
