"""Every streamed evaluator (``clus_jax.evaluate.benchmarks``) run through ``registry.run`` with the encoders
the trainer builds (``encoders.make_encoders``) on the tiny CLIP model of tests/evaluate/test_encoders.py, bound
to its fixed parameters; shared by tests/evaluate/test_benchmarks_sharded.py and, run as a script, one process
of its local multi-process job (the ``CLUS_JAX_*`` environment of ``parallel/distributed.py``):

    python tests/evaluate/multiprocess_eval.py OUT.json FOLDER BATCH [BATCH ...]

writes the figures this process got at each batch size: ``{"process": [index, count], "devices": [local,
global], "runs": {BATCH: {"batch_size": the encoders' global batch, "metrics": {...}}}}``.
"""
from __future__ import annotations

import importlib.util
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
#: Set sizes no batch size of the tests divides.
TEST_SIZE, TRAIN_SIZE = 37, 53


def _load(name: str, *path: str):
    """The test module at ``tests/<path>`` as ``name`` (what tests/conftest.py registers, outside pytest)."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, os.path.join(os.path.dirname(HERE), *path))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def evals(folder: str) -> dict:
    """``config.evals``: each streamed evaluator on synthetic sets, and zeroshot, retrieval and clusters on the
    image ``folder`` that holds one corrupt file."""
    test, train = f"synthetic:{TEST_SIZE}", f"synthetic:{TRAIN_SIZE}"
    return {
        "zs": dict(type="zeroshot", data=test),
        "ret": dict(type="retrieval", data=train),
        "few": dict(type="fewshot", data=test, train_data=train, shots=(1, 2), seeds=2),
        "knn": dict(type="knn", data=test, train_data=train, k=5),
        "clu": dict(type="clusters", data=train),
        "fzs": dict(type="zeroshot", data=f"folder:{folder}"),
        "fret": dict(type="retrieval", data=f"folder:{folder}"),
        "fclu": dict(type="clusters", data=f"folder:{folder}"),
    }


def figures(mesh_config: dict, devices, batch_size: int, folder: str) -> tuple[int, dict[str, float]]:
    """(the encoders' global batch, the metrics of every entry of ``evals(folder)``) on a mesh of ``devices``."""
    from clus_jax.data.tokenizers import create_tokenizer
    from clus_jax.evaluate import encoders, registry

    _load("train_helpers", "train", "helpers.py")
    _load("tolerances", "tolerances.py")
    test_encoders = _load("test_encoders_setup", "evaluate", "test_encoders.py")
    config, model, mesh, rules, shardings, params = test_encoders.setup(mesh_config, devices)
    tokenizer = create_tokenizer(config.tokenizer.name, int(config.model.text.context_length))
    enc = encoders.make_encoders(model, mesh, rules, shardings, tokenizer, batch_size)(params)
    entries = evals(folder)
    config.evals.update(entries)
    config.evals.run = ",".join(entries)
    ctx = registry.EvalContext(enc.images, enc.texts, ("image", "text"), {}, config, image_rows=enc.image_rows,
                               batch_size=enc.batch_size)
    return enc.batch_size, registry.run(config, ctx).metrics


def main(out: str, folder: str, *batches: str) -> None:
    from clus_jax.parallel import distributed

    distributed.maybe_initialize()
    import jax

    runs = {}
    for batch in batches:
        got, metrics = figures({"data": jax.device_count()}, jax.devices(), int(batch), folder)
        runs[batch] = {"batch_size": got, "metrics": metrics}
    with open(out, "w") as f:
        json.dump({"process": [jax.process_index(), jax.process_count()], "devices": [jax.local_device_count(),
                   jax.device_count()], "runs": runs}, f)


if __name__ == "__main__":
    main(*sys.argv[1:])
