"""GradCache (Gao et al. 2021): the exact global-batch gradient with the towers run one micro-batch at a time.

Contrastive and clustering losses couple every example of the batch (negatives, Sinkhorn sums, queues), so
summing per-micro-batch losses is not the global-batch loss. GradCache splits the gradient instead:

  (a) ``forward``: the towers' outputs of every micro-batch, without keeping activations (``lax.map``);
  (b) the loss of the *global* batch of outputs and its gradient with respect to those outputs (the caller);
  (c) ``tower_gradients``: per micro-batch, the forward again and a VJP of the cached output gradient,
      summed over micro-batches in a ``lax.scan``, so memory holds one micro-batch's activations.

The result is the full-batch gradient up to summation order. Micro-batch ``i`` takes rows ``i`` of every
device's share of the batch (``Microbatches.split``): each micro-batch stays spread over all data-parallel
devices and splitting moves no data between them.

Tower outputs are either per-example (leading axis the batch: embeddings) or scalars that do not depend on
the batch (logit scale and bias); a scalar is taken from micro-batch 0 and its gradient is propagated once.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from clus_jax.data import fields

PyTree = Any
ApplyFn = Callable[[PyTree, Mapping[str, jax.Array]], dict[str, jax.Array]]


@dataclasses.dataclass(frozen=True)
class Microbatches:
    """How a global batch of ``batch_size`` rows, split over ``shards`` data-parallel devices, becomes
    ``num`` micro-batches. ``mesh`` and ``batch_axes`` place the micro-batch axis (None: no constraint)."""

    num: int
    batch_size: int
    shards: int
    mesh: Mesh | None = None
    batch_axes: tuple[str, ...] = ()

    def __post_init__(self):
        if self.num < 1 or self.batch_size % (self.num * self.shards):
            raise ValueError(f"a batch of {self.batch_size} does not split into {self.num} micro-batches on "
                             f"{self.shards} data-parallel devices")

    @property
    def rows(self) -> int:
        """Rows of one micro-batch (over all devices)."""
        return self.batch_size // self.num

    def _constrain(self, x: jax.Array, *leading: Any) -> jax.Array:
        if self.mesh is None or not self.batch_axes:
            return x
        spec = P(*leading, self.batch_axes, *([None] * (x.ndim - len(leading) - 1)))
        return lax.with_sharding_constraint(x, NamedSharding(self.mesh, spec))

    def split(self, x: jax.Array) -> jax.Array:
        """[B, ...] -> [M, B / M, ...]; micro-batch i holds rows i * b .. (i + 1) * b - 1 of every device's
        B / shards rows (b = B / (M * shards)), in device order."""
        b = self.batch_size // (self.num * self.shards)
        y = x.reshape(self.shards, self.num, b, *x.shape[1:]).swapaxes(0, 1)
        return self._constrain(y.reshape(self.num, self.rows, *x.shape[1:]), None)

    def merge(self, y: jax.Array) -> jax.Array:
        """The inverse of ``split``: [M, B / M, ...] -> [B, ...] in the original row order."""
        b = self.batch_size // (self.num * self.shards)
        x = y.reshape(self.num, self.shards, b, *y.shape[2:]).swapaxes(0, 1)
        return self._constrain(x.reshape(self.batch_size, *y.shape[2:]))

    def split_inputs(self, batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
        """The towers' inputs of ``batch`` ('image', 'text'), split into micro-batches."""
        return {k: self.split(batch[k]) for k in fields.MODALITIES if k in batch}

    def holds(self, batch: Mapping[str, jax.Array]) -> bool:
        """True when ``batch``'s tower inputs have the global batch size (so they can be split)."""
        sizes = {batch[k].shape[0] for k in fields.MODALITIES if k in batch}
        return bool(sizes) and sizes == {self.batch_size}


def _is_scalar(x: jax.Array) -> bool:
    return jnp.ndim(x) == 0


def _check_per_example(outputs: Mapping[str, jax.Array], rows: int) -> None:
    for name, x in outputs.items():
        if not _is_scalar(x) and x.shape[0] != rows:
            raise ValueError(f"tower output {name!r} of shape {x.shape} is neither per-example (leading axis "
                             f"{rows}) nor a scalar; micro-batching cannot split it")


def forward(apply_fn: ApplyFn, model_params: PyTree, batch: Mapping[str, jax.Array],
            micro: Microbatches) -> dict[str, jax.Array]:
    """The towers' outputs for the global batch, computed micro-batch by micro-batch (pass (a)).

    Only the outputs are kept between micro-batches; differentiating through this keeps every micro-batch's
    activations (use ``tower_gradients`` for the gradient).
    """
    def one(mb):
        out = apply_fn(model_params, mb)
        _check_per_example(out, micro.rows)
        return out

    stacked = lax.map(one, micro.split_inputs(batch))
    return {k: v[0] if v.ndim == 1 else micro.merge(v) for k, v in stacked.items()}


def micro_batched(apply_fn: ApplyFn, micro: Microbatches) -> ApplyFn:
    """``apply_fn`` that runs a global batch micro-batch by micro-batch (the objectives' own forwards: an EMA
    teacher, momentum towers); any other batch size runs whole."""
    def apply(model_params: PyTree, batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
        if not micro.holds(batch):
            return apply_fn(model_params, batch)
        return forward(apply_fn, model_params, batch, micro)

    return apply


def tower_gradients(apply_fn: ApplyFn, params: PyTree, batch: Mapping[str, jax.Array],
                    output_grads: Mapping[str, jax.Array], micro: Microbatches) -> PyTree:
    """Sum over micro-batches of the VJP of ``apply_fn(params, micro-batch)`` with the cached gradient of the
    global-batch loss with respect to the outputs (pass (c)); the forward is recomputed per micro-batch.

    ``output_grads`` has the outputs' structure: per-example entries [B, ...] and scalars (whose gradient is
    applied with micro-batch 0 only, the micro-batch ``forward`` took them from).
    """
    per_example = {k: micro.split(g) for k, g in output_grads.items() if not _is_scalar(g)}
    scalars = {k: g for k, g in output_grads.items() if _is_scalar(g)}

    def body(acc, xs):
        index, mb, grads = xs
        outputs, vjp = jax.vjp(lambda p: apply_fn(p, mb), params)
        cotangent = {}
        for k, out in outputs.items():
            g = grads[k] if k in grads else jnp.where(index == 0, scalars[k], jnp.zeros_like(scalars[k]))
            cotangent[k] = g.astype(out.dtype)
        (g_params,) = vjp(cotangent)
        return jax.tree.map(jnp.add, acc, g_params), None

    zeros = jax.tree.map(jnp.zeros_like, params)
    summed, _ = lax.scan(body, zeros, (jnp.arange(micro.num), micro.split_inputs(batch), per_example))
    return summed
