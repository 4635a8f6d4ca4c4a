"""The evaluation of a train state: encode functions for the evaluators (fixed-size padded batches,
sharded over the mesh, every host alike), the prototype banks it is scored with, and where it is saved.

Every process holds the whole (small) evaluation array; each one feeds its share of every padded batch,
so all hosts run the same number of identical-shape steps and get the full result back.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import numpy as np

from clus_jax.evaluate import artifacts, runner
from clus_jax.objectives import prototypes
from clus_jax.parallel import multihost

PyTree = Any


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
