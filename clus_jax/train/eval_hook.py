"""One evaluation of a run: the objectives' heads and scalars, the evaluators of ``config.evals.run``, the
arrays saved under ``<workdir>/eval/step_<N>/``. Shared by the loop and the re-evaluation of a checkpoint."""
from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import ml_collections
import numpy as np

from clus_jax.evaluate import artifacts
from clus_jax.evaluate.encoders import Encoders
from clus_jax.evaluate import registry as evaluators
from clus_jax.objectives import registry as objectives
from clus_jax.parallel import multihost

PyTree = Any
#: ``params_of(name)``: objective ``name``'s own parameters as host NumPy arrays ({} when it has none).
ParamsOf = Callable[[str], PyTree]


def state_params(params: PyTree) -> ParamsOf:
    """``params_of`` for a train state's parameters; works on sharded (multi-host) arrays and NumPy trees alike."""

    def host(x):
        return np.asarray(multihost.to_host(x) if isinstance(x, jax.Array) else x)

    return lambda name: jax.tree.map(host, params.get(name, {}))


def objective_outputs(config: ml_collections.ConfigDict,
                      params_of: ParamsOf) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """The cluster heads of every objective of ``config.objectives`` (one namespace) and their scalars, named
    ``objectives/<objective>/<metric>``."""
    heads: dict[str, np.ndarray] = {}
    scalars: dict[str, float] = {}
    for name in dict(config.objectives):
        objective = objectives.get(name)
        if not objectives.implements(objective, "eval_heads", "eval_metrics"):  # else its parameters stay put
            continue
        own = params_of(name)
        for head, array in objective.eval_heads(own, config).items():
            if head in heads:
                raise ValueError(f"config.objectives: two objectives name a cluster head {head!r}")
            heads[head] = np.asarray(array)
        scalars.update({f"objectives/{name}/{k}": float(v) for k, v in objective.eval_metrics(own, config).items()})
    return heads, scalars


def evaluate_and_save(config: ml_collections.ConfigDict, modalities: Sequence[str],
                      encoders: Encoders, params_of: ParamsOf, workdir: str,
                      step: int, names: Sequence[str] | None = None, *, out: str | None = None,
                      model: str | None = None, pretrained: str | None = None) -> evaluators.Evaluation:
    """Runs the entries ``names`` (default: all of ``config.evals.run``) with ``encoders`` and the objectives'
    heads, adds the objectives' scalars, and has process 0 save the arrays and the entries' CLIP_benchmark-style
    results under ``<workdir>/eval/step_<step>/`` (``evaluate.artifacts``), or under ``out``; the reports name
    ``model`` (default: the workdir) and ``pretrained`` (default: ``step_<step>``). Returns the evaluation; its
    metrics are {} (nothing saved) when there is nothing to report."""
    names = evaluators.run_names(config) if names is None else list(names)
    if not names:
        return evaluators.Evaluation(metrics={})
    heads, scalars = objective_outputs(config, params_of)
    ctx = evaluators.EvalContext(encoders.images, encoders.texts, modalities=tuple(modalities), heads=heads,
                                 config=config, image_rows=encoders.image_rows, batch_size=encoders.batch_size)
    evaluation = evaluators.run(config, ctx, names)
    evaluation.metrics.update(scalars)
    if not evaluation.metrics:
        return evaluators.Evaluation(metrics={})
    if jax.process_index() == 0:
        artifacts.write(evaluation, out or artifacts.step_dir(workdir, step), model=model or str(workdir),
                        pretrained=f"step_{step}" if pretrained is None else pretrained)
    return evaluation
