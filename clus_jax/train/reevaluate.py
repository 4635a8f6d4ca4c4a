"""Re-evaluation of a finished run: ``python -m clus_jax.evaluate WORKDIR [--step S] [--evals NAMES]``.

Loads the run's model with ``clus_jax.load`` and, for every objective of ``config.objectives`` that adds to the
evaluation, its own parameters from the checkpoint; runs the same evaluation as the trainer (the entries
``config.evals.run`` names) and writes the same metric names: one line appended to ``<workdir>/metrics.jsonl``
at the checkpoint's step (readers take the newest line of a step) and the arrays under
``<workdir>/eval/step_<S>/``. Figures of a metric that existed at training time equal the run's own.
"""
from __future__ import annotations

import time


def reevaluate(workdir: str, step: int | None = None, *, batch_size: int | None = None, append: bool = True,
               evals: str | None = None) -> tuple[int, dict[str, float]]:
    """Evaluates checkpoint ``step`` (the newest when None) of the run in ``workdir``.

    Returns (step, metrics). ``append=False`` leaves ``metrics.jsonl`` alone (the arrays are still written).
    ``evals`` replaces the run's ``config.evals.run`` (e.g. 'embedded' for a run trained without evaluation).
    """
    from clus_jax.config.check import check_evals
    from clus_jax.config.run_config import load_run_config
    from clus_jax.inference import load
    from clus_jax.objectives import teachers
    from clus_jax.train.experiment import modalities
    from clus_jax.train.eval_hook import evaluate_and_save
    from clus_jax.train.metrics_writer import MetricWriter

    config = load_run_config(workdir)
    if evals is not None:
        config.evals.run = evals
    check_evals(config)  # before any weight is read
    model = load(workdir, step, batch_size=batch_size)
    step = int(model.step if model.step is not None else step or 0)
    saved = teachers.saved_param_shapes(workdir, step)

    def params_of(name: str):
        return teachers.load_params(workdir, step, include=(name,))[name] if name in saved else {}

    t0 = time.time()
    results = evaluate_and_save(config, modalities(config), model.encoders, params_of, workdir, step).metrics
    if not results:
        raise ValueError(f"nothing to evaluate: config.evals.run={config.evals.run!r} gives no metric for this run's "
                         f"towers {modalities(config)}")
    results["eval/seconds"] = time.time() - t0
    if append:
        writer = MetricWriter(workdir, tensorboard=False)
        writer.write(step, results)
        writer.close()
    return step, results
