"""Encode functions for evaluation: fixed-size padded batches, sharded over the mesh, every host alike.

Every process holds the whole (small) evaluation array; each one feeds its share of every padded batch,
so all hosts run the same number of identical-shape steps and get the full result back.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from clus_jax.parallel import multihost, partitioning

PyTree = Any


def make_encoders(
    model: nn.Module, mesh: Mesh, rules, param_shardings: PyTree, tokenizer: Callable[[list[str]], np.ndarray], batch_size: int
) -> Callable[[PyTree], tuple[Callable, Callable]]:
    """Returns ``bind(params) -> (encode_images, encode_texts)``; the jitted encoders are built once."""
    dp = int(np.prod([mesh.shape[a] for a in partitioning.batch_axes(mesh, rules)] or [1]))
    per_process = dp * jax.process_count()
    batch_size = max(per_process, batch_size // per_process * per_process)
    out_sharding = NamedSharding(mesh, P())

    def jitted(method: str):
        fn = lambda params, x: model.apply({"params": params}, x, method=method)
        return jax.jit(fn, in_shardings=(param_shardings, partitioning.batch_sharding(mesh, rules, 4 if method == "encode_image" else 2)),
                       out_shardings=out_sharding)

    enc_img, enc_txt = jitted("encode_image"), jitted("encode_text")

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

        return encode_images, encode_texts

    return bind
