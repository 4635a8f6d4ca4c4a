"""Encode functions for evaluation: fixed-size padded batches, sharded over the mesh, every host alike.

Two ways in. ``images``/``texts`` take a whole (small) array that every process holds; each process feeds its
share of every padded batch, so all hosts run the same number of identical-shape steps and get the full result
back. ``image_rows`` is for data streamed from disk: each process passes only its own rows of one global batch of
``batch_size`` (``multihost.process_slice``), with their validity and labels, and gets back the whole batch's
embeddings, validity and labels: the only thing gathered across devices and processes.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from clus_jax.parallel import multihost, partitioning

PyTree = Any
#: ``image_rows(images, valid, labels)``: this process's rows of one global batch -> the batch's (embeddings
#: float [B, D], valid bool [B], labels int32 [B]) on every process.
RowEncoder = Callable[[np.ndarray, np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray, np.ndarray]]


class Encoders(NamedTuple):
    """A run's encoders for evaluation (see the module docstring)."""

    images: Callable[[np.ndarray], np.ndarray]
    texts: Callable[[Sequence[str]], np.ndarray]
    image_rows: RowEncoder
    batch_size: int  # the global batch of ``image_rows``: a multiple of the data-parallel devices and processes


def make_encoders(
    model: nn.Module, mesh: Mesh, rules, param_shardings: PyTree, tokenizer: Callable[[list[str]], np.ndarray], batch_size: int
) -> Callable[[PyTree], Encoders]:
    """Returns ``bind(params) -> Encoders``; the jitted encoders are built once."""
    dp = int(np.prod([mesh.shape[a] for a in partitioning.batch_axes(mesh, rules)] or [1]))
    per_process = dp * jax.process_count()
    batch_size = max(per_process, batch_size // per_process * per_process)
    out_sharding = NamedSharding(mesh, P())

    def jitted(method: str):
        fn = lambda params, x: model.apply({"params": params}, x, method=method)
        return jax.jit(fn, in_shardings=(param_shardings, partitioning.batch_sharding(mesh, rules, 4 if method == "encode_image" else 2)),
                       out_shardings=out_sharding)

    enc_img, enc_txt = jitted("encode_image"), jitted("encode_text")
    sharded = [partitioning.batch_sharding(mesh, rules, n) for n in (4, 1, 1)]
    enc_rows = jax.jit(
        lambda params, x, valid, labels: (model.apply({"params": params}, x, method="encode_image"), valid, labels),
        in_shardings=(param_shardings, *sharded), out_shardings=(out_sharding,) * 3)

    def run(fn, params, data: np.ndarray) -> np.ndarray:
        n = len(data)
        padded = -(-n // batch_size) * batch_size
        if padded != n:
            data = np.concatenate([data, np.repeat(data[-1:], padded - n, axis=0)])
        sharding = partitioning.batch_sharding(mesh, rules, data.ndim)
        outs = []
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            for start in range(0, padded, batch_size):
                chunk = data[start : start + batch_size]
                local = chunk[multihost.process_slice(batch_size)]
                x = jax.make_array_from_process_local_data(sharding, local, chunk.shape)
                outs.append(multihost.to_host(fn(params, x)))
        return np.concatenate(outs)[:n]

    def bind(params: PyTree):
        def encode_images(images: np.ndarray) -> np.ndarray:
            return run(enc_img, params, np.asarray(images))

        def encode_texts(texts: Sequence[str]) -> np.ndarray:
            return run(enc_txt, params, np.asarray(tokenizer(list(texts))))

        def image_rows(images: np.ndarray, valid: np.ndarray, labels: np.ndarray):
            local = (np.asarray(images), np.asarray(valid, bool), np.asarray(labels, np.int32))
            if len(local[0]) * jax.process_count() != batch_size:
                raise ValueError(f"image_rows takes this process's {batch_size // jax.process_count()} rows of a "
                                 f"{batch_size}-row batch; got {len(local[0])}")
            with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
                arrays = [jax.make_array_from_process_local_data(sh, x, (batch_size, *x.shape[1:]))
                          for sh, x in zip(sharded, local)]
                out = enc_rows(params, *arrays)
            return tuple(multihost.to_host(x) for x in out)

        return Encoders(encode_images, encode_texts, image_rows, batch_size)

    return bind
