"""SwAV's feature queue: a FIFO of past (detached) embeddings that enlarges the Sinkhorn input.

Layout: [slots, B, D] with slots = queue_length / B, newest batch in slot 0. Axis 1 is the global batch
axis and carries the logical name 'batch', so each device holds the rows of its own batch shard for every
slot (SwAV's per-GPU queue) and the shift along axis 0 moves no data between devices. The global array is
the same on every mesh, which keeps checkpoints portable and lets one device reproduce a sharded run.

Semantics: insertion starts at ``queue_start_step``; the queue is used (its rows re-scored with the
current prototypes and placed before the batch in the Sinkhorn input) only once every slot has been
written, counting writes made before the current step.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

PyTree = Any
LOGICAL_AXES = (None, "batch", "proj")


def init(queue_length: int, batch_size: int, dim: int, modalities: tuple[str, ...] = ("image", "text")) -> PyTree:
    """Empty queues (boxed, sharded over 'batch') plus the count of batches written so far."""
    slots = queue_length // batch_size
    state = {m: nn.LogicallyPartitioned(jnp.zeros((slots, batch_size, dim), jnp.float32), LOGICAL_AXES) for m in modalities}
    state["filled"] = jnp.zeros([], jnp.int32)
    return state


def num_slots(queue: PyTree) -> int:
    return next(v for k, v in queue.items() if k != "filled").shape[0]


def is_full(queue: PyTree) -> jax.Array:
    """True once every slot holds a past batch."""
    return queue["filled"] >= num_slots(queue)


def push(queue: PyTree, rows: dict[str, jax.Array], insert: jax.Array) -> PyTree:
    """Shifts every queue by one slot and writes ``rows[m]`` ([B, D]) in front, where ``insert`` is true."""
    new = {}
    for m, q in queue.items():
        if m == "filled":
            continue
        shifted = jnp.concatenate([jax.lax.stop_gradient(rows[m]).astype(q.dtype)[None], q[:-1]], axis=0)
        new[m] = jnp.where(insert, shifted, q)
    new["filled"] = jnp.minimum(queue["filled"] + insert.astype(jnp.int32), num_slots(queue))
    return new
