"""The evaluation of a train state: encode functions for the evaluators (fixed-size padded batches,
sharded over the mesh, every host alike), the prototype banks it is scored with, and where it is saved.

Every process holds the whole (small) evaluation array; each one feeds its share of every padded batch,
so all hosts run the same number of identical-shape steps and get the full result back.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from clus_jax.evaluate import artifacts, runner
from clus_jax.objectives import prototypes
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


def prototype_banks(params: PyTree) -> dict[str, np.ndarray]:
    """The swap objective's banks ``{'bank_<i>': [K_i, D]}`` of a run's parameters, on the host in bank
    order; empty when the run has none. Works on sharded (multi-host) arrays and on NumPy trees alike."""
    banks = params.get(prototypes.PARAMS_KEY) if hasattr(params, "get") else None
    if not banks:
        return {}
    return {name: np.asarray(multihost.to_host(banks[name]) if isinstance(banks[name], jax.Array) else banks[name])
            for name in prototypes.bank_names(len(banks))}


def evaluate_and_save(sets: Sequence[runner.EvalSet], encoders: tuple[Callable, Callable], params: PyTree,
                      workdir: str, step: int) -> dict[str, float]:
    """Evaluates ``sets`` with ``encoders`` and the banks of ``params``; process 0 saves the arrays under
    ``<workdir>/eval/step_<step>/`` (``evaluate.artifacts``). Returns the metrics."""
    evaluation = runner.run(sets, *encoders, banks=prototype_banks(params))
    if jax.process_index() == 0:
        artifacts.write(evaluation, artifacts.step_dir(workdir, step))
    return evaluation.metrics
