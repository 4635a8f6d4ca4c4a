"""Re-evaluation of a finished run: ``python -m clus_jax.evaluate WORKDIR [--step S]``.

Loads the run's model with ``clus_jax.load`` and its prototype banks (if it trained the swap objective)
from the checkpoint, runs the same evaluation as the trainer (the sets ``config.evals.sets`` names, those
the run's towers can be scored on), and writes the same metric names: one line appended to
``<workdir>/metrics.jsonl`` at the checkpoint's step (readers take the newest line of a step) and the arrays
under ``<workdir>/eval/step_<S>/``. Figures of a metric that existed at training time equal the run's own.
"""
from __future__ import annotations

import time
from collections.abc import Callable

from clus_jax.evaluate.runner import EvalSet


def reevaluate(workdir: str, step: int | None = None, *, batch_size: int | None = None, append: bool = True,
               sets: str | None = None,
               load_sets: Callable[..., list[EvalSet]] | None = None) -> tuple[int, dict[str, float]]:
    """Evaluates checkpoint ``step`` (the newest when None) of the run in ``workdir``.

    Returns (step, metrics). ``append=False`` leaves ``metrics.jsonl`` alone (the arrays are still written).
    ``sets`` replaces the run's ``config.evals.sets`` (e.g. 'embedded' for a run trained without evaluation).
    ``load_sets(config)`` gives the evaluation sets; the trainer's ``load_eval_sets`` when None.
    """
    from clus_jax.inference import load
    from clus_jax.evaluate.runner import sets_for
    from clus_jax.train.experiment import modalities
    from clus_jax.objectives import prototypes, teachers
    from clus_jax.train import loop
    from clus_jax.train.eval_hook import evaluate_and_save
    from clus_jax.train.metrics_writer import MetricWriter

    model = load(workdir, step, batch_size=batch_size)
    step = int(model.step if model.step is not None else step or 0)
    banks = {}
    if prototypes.PARAMS_KEY in teachers.saved_param_shapes(workdir, step):
        banks = teachers.load_params(workdir, step, include=(prototypes.PARAMS_KEY,))
    config = model.config
    if sets is not None:
        config = config.copy_and_resolve_references()
        config.evals.sets = sets
    eval_sets = sets_for((load_sets or loop.load_eval_sets)(config), modalities(config))
    if not eval_sets:
        raise ValueError(f"nothing to evaluate: config.evals.sets={config.evals.sets!r} gives no set this run's "
                         f"towers {modalities(config)} can be scored on")
    t0 = time.time()
    results = evaluate_and_save(eval_sets, (model.encode_image, model.encode_text), banks, workdir, step)
    results["eval/seconds"] = time.time() - t0
    if append:
        writer = MetricWriter(workdir, tensorboard=False)
        writer.write(step, results)
        writer.close()
    return step, results
