"""Prototype banks of the swap objective: sizes, initialisation, unit-row rewrite, scores, mesh placement.

The banks are the swap objective's own parameters ``params['swap']['bank_<i>']`` of shape [K_i, D] with
logical axes ('prototypes', 'proj'), sized by ``config.swap.num_prototypes``. Several banks of different
sizes are several clusterings trained side by side.
"""
from __future__ import annotations

import numbers
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import Mesh

from clus_jax.parallel import partitioning

PyTree = Any
AxisSpec = str | tuple[str, ...] | None

#: Where the banks live in the parameter tree, and the regex of their paths (as ``common.trees.path_str`` writes them).
PARAMS_KEY = "swap"
PARAM_PATTERN = r"^swap/"
LOGICAL_AXES = ("prototypes", "proj")


def bank_names(num_banks: int) -> list[str]:
    return [f"bank_{i}" for i in range(num_banks)]


def bank_sizes(swap_config: ml_collections.ConfigDict) -> tuple[int, ...]:
    """``config.swap.num_prototypes`` (an int or a list of ints) as a tuple of ints; empty when unset."""
    value = swap_config.get("num_prototypes") or ()
    return (int(value),) if isinstance(value, numbers.Integral) else tuple(int(k) for k in value)


def normalized_rows_init(key: jax.Array, shape: Sequence[int], dtype: Any = jnp.float32) -> jax.Array:
    """Gaussian rows scaled to unit length (prototypes start on the sphere)."""
    return normalize_rows(jax.random.normal(key, shape, jnp.float32)).astype(dtype)


def init_banks(rng: jax.Array, sizes: Sequence[int], embed_dim: int) -> dict[str, nn.LogicallyPartitioned]:
    """One [K_i, embed_dim] bank of unit rows per size, boxed with the banks' logical axes."""
    init = nn.with_logical_partitioning(normalized_rows_init, LOGICAL_AXES)
    keys = jax.random.split(rng, len(sizes))
    return {name: init(key, (int(k), int(embed_dim))) for name, key, k in zip(bank_names(len(sizes)), keys, sizes)}


def normalize_rows(bank: jax.Array, eps: float = 1e-12) -> jax.Array:
    """Rows scaled to unit L2 norm, computed in float32 and returned in the bank's dtype."""
    x = bank.astype(jnp.float32)
    return (x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)).astype(bank.dtype)


def normalize_banks(params: PyTree) -> PyTree:
    """``params`` with every prototype bank rewritten to unit rows (other entries untouched)."""
    banks = params[PARAMS_KEY]
    return {**params, PARAMS_KEY: {name: normalize_rows(bank) for name, bank in banks.items()}}


def scores(embeddings: jax.Array, bank: jax.Array) -> jax.Array:
    """Cosine scores [N, K] of unit embeddings [N, D] against unit prototype rows [K, D], in float32."""
    return jnp.einsum("nd,kd->nk", embeddings, bank, preferred_element_type=jnp.float32)


def mesh_axis(
    num_prototypes: int, config: ml_collections.ConfigDict, mesh: Mesh, batch_axes: Sequence[str] = ()
) -> AxisSpec:
    """Mesh axis (or axes) a bank of ``num_prototypes`` rows is split over, or None.

    Resolved exactly as the bank parameter itself is placed: the 'prototypes' logical rule of
    ``config.logical_axis_rules`` on ``mesh``, keeping only axes of size > 1 whose product divides K.
    Axes that also split the batch are dropped, since one shard_map dimension cannot reuse them.
    """
    rules = [tuple(r) for r in config.logical_axis_rules]
    spec = partitioning.logical_to_spec(LOGICAL_AXES, (num_prototypes, int(config.model.embed_dim)), rules, mesh)
    first = spec[0] if len(spec) else None
    axes = (first,) if isinstance(first, str) else tuple(first or ())
    axes = tuple(a for a in axes if a not in tuple(batch_axes))
    if not axes:
        return None
    return axes[0] if len(axes) == 1 else axes
