"""Re-evaluation of a finished run or of an open_clip checkpoint: what ``python -m clus_jax.evaluate`` runs.

A run (a workdir): its model is loaded with ``clus_jax.load`` and, for every objective of ``config.objectives``
that adds to the evaluation, its own parameters from the checkpoint; the evaluation is the trainer's, with the
same metric names: one line appended to ``<workdir>/metrics.jsonl`` at the checkpoint's step (readers take the
newest line of a step) and the files under ``<workdir>/eval/step_<S>/``. Figures of a metric that existed at
training time equal the run's own.

An open_clip checkpoint (``interop.open_clip.is_source``: a folder with ``open_clip_config.json``, or a weights
file and its model config) is loaded by ``interop.open_clip.load_open_clip`` into the same encoders; its config
is clus_jax's defaults with the checkpoint's architecture. It has no workdir, so its files go to ``out``; the
reports name the source as ``model`` and its weights file as ``pretrained``.

What runs (``evals``): entry names of the config's ``config.evals``, comma-separated (they replace
``config.evals.run``), or one **suite**: ``path/to/suite.py`` or ``path/to/suite.py:ARG``, a Python file whose
``get_config()`` (``get_config(ARG)``, ARG a string, as ``--config`` passes it) returns a ConfigDict of entries,
``{'mnist': {'type': 'zeroshot', 'data': ..., ...}, ...}``. They are merged into ``config.evals`` (a suite entry
replaces the config's entry of the same name) and all of them run, in the order of their names; a suite may set
``run`` itself to run some of them or fix their order (what its ARG selects is the suite's own business), and
``batch_size``. ``configs/evals/`` holds
suites.

Where the files go (``out``): instead of the workdir, a new or empty folder gets the evaluation's
``metrics.json``, arrays and ``benchmarks/<entry>.json``, and ``metrics.jsonl`` is left alone. The folder is
filled beside ``out`` and renamed into place once complete: a failed evaluation leaves nothing.
"""
from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator

import ml_collections
from etils import epath

from clus_jax.common import cli
from clus_jax.common.errors import ConfigError, UsageError


def is_suite(evals: str) -> bool:
    """Whether ``--evals`` names a suite file (``path.py`` or ``path.py:ARG``) rather than entries."""
    return evals.partition(":")[0].endswith(".py")


def load_suite(spec: str) -> ml_collections.ConfigDict:
    """The entries (and optional ``run``, ``batch_size``) of suite ``spec``; UsageError naming ``--evals`` and the
    file when it is missing, has no ``get_config`` or gives no entry."""
    from clus_jax.config.base import load_config_module

    path, _, arg = spec.partition(":")
    try:
        module = load_config_module(path)
    except (FileNotFoundError, SyntaxError, ImportError) as e:
        raise UsageError(f"--evals {spec}: {cli.exception_text(e)}") from None
    get_config = getattr(module, "get_config", None)
    if not callable(get_config):
        raise UsageError(f"--evals {spec}: {path} defines no get_config() (returning the suite's entries)")
    try:
        suite = get_config(arg) if arg else get_config()
    except (KeyError, TypeError, ValueError) as e:  # a mistyped argument: get_config's message names it
        raise UsageError(f"--evals {spec}: {cli.exception_text(e)}") from None
    from clus_jax.evaluate.registry import entries_in

    if not isinstance(suite, (dict, ml_collections.ConfigDict)) or not entries_in(suite):
        raise UsageError(f"--evals {spec}: get_config() of {path} returned no entry (a ConfigDict of "
                         "{name: {'type': <evaluator>, ...}})")
    return ml_collections.ConfigDict(dict(suite))


def select_evals(config: ml_collections.ConfigDict, evals: str | None) -> None:
    """Applies ``evals`` (entry names or a suite, module docstring) to ``config.evals`` and checks the result
    before any weight is read; a suite's mistake is a UsageError naming ``--evals`` and the file."""
    from clus_jax.config.check import check_evals

    if evals is None or not is_suite(evals):
        if evals is not None:
            config.evals.run = evals
        check_evals(config)
        return
    from clus_jax.evaluate.registry import entries_in

    suite = load_suite(evals)
    for key, value in suite.items():
        if key in config.evals:
            del config.evals[key]  # a whole entry replaced, not merged key by key
        config.evals[key] = value
    if "run" not in suite:
        config.evals.run = ",".join(entries_in(suite))
    try:
        check_evals(config)
    except ConfigError as e:
        raise UsageError(f"--evals {evals}: {e}") from None


def check_new_out(out: str) -> None:
    """UsageError unless ``out`` is a new or empty folder."""
    cli.check_out_dir("--out", out)
    path = epath.Path(out)
    if path.is_dir() and any(path.iterdir()):
        raise UsageError(f"--out {out} is not empty; pass a new or empty folder for the evaluation's files")


@contextlib.contextmanager
def _filled_then_renamed(out: str | None) -> Iterator[str | None]:
    """The folder to write the evaluation into: a temporary one beside ``out`` (process 0; renamed to ``out``
    when the block succeeds, removed otherwise), ``out`` itself on the other processes (they write nothing)."""
    import jax

    from clus_jax.common import files

    if out is None or jax.process_index() != 0:
        yield out
        return
    with files.atomic_path(out) as tmp:
        yield os.fspath(tmp)
        if epath.Path(out).is_dir():  # empty (check_new_out): it makes way for the filled one
            epath.Path(out).rmdir()


def reevaluate(source: str, step: int | None = None, *, batch_size: int | None = None, append: bool = True,
               evals: str | None = None, out: str | None = None,
               model_config: str | None = None) -> tuple[int | None, dict[str, float]]:
    """Evaluates checkpoint ``step`` (the newest when None) of the run in ``source``, or the open_clip checkpoint
    ``source`` (``model_config``: its open_clip model config, for a weights file; ``out`` required).

    Returns (step, metrics); step is None for an open_clip checkpoint. ``append=False`` leaves ``metrics.jsonl``
    alone (the files are still written); so does ``out``. ``evals``: entry names or a suite (module docstring).
    """
    from clus_jax.interop import open_clip
    from clus_jax.train.experiment import modalities
    from clus_jax.train.eval_hook import evaluate_and_save

    foreign = open_clip.is_source(source)
    if foreign:
        if out is None:
            raise UsageError(f"--out: {source} is an open_clip checkpoint, which has no workdir to write into; "
                             "pass --out DIR")
        if step is not None:
            raise UsageError(f"--step {step}: {source} is an open_clip checkpoint, which has no steps")
        if model_config is None and not os.path.isdir(source):
            raise UsageError(f"--model-config: {source} is a weights file; pass its open_clip model config "
                             "(e.g. open_clip's model_configs/ViT-B-32.json)")
        config = open_clip.run_config(*open_clip.resolve(source, model_config)[1:])
    else:
        from clus_jax.config.run_config import load_run_config

        if model_config is not None:
            raise UsageError(f"--model-config {model_config}: {source} is a clus_jax run, which has its own config")
        config = load_run_config(source)
    select_evals(config, evals)  # before any weight is read
    if out is not None:
        check_new_out(out)
    batch_size = batch_size or config.evals.batch_size
    if foreign:
        model = open_clip.load_open_clip(source, model_config, batch_size=batch_size)
        pretrained, params_of = model.checkpoint, (lambda name: {})
    else:
        model, step, params_of = _run_model(source, step, batch_size)
        pretrained = f"step_{step}"

    t0 = time.time()
    with _filled_then_renamed(out) as directory:
        results = evaluate_and_save(config, modalities(config), model.encoders, params_of, source, step or 0,
                                    out=directory, model=str(source), pretrained=pretrained).metrics
        if not results:
            raise ValueError(f"nothing to evaluate: config.evals.run={config.evals.run!r} gives no metric for "
                             f"this model's towers {modalities(config)}")
    results["eval/seconds"] = time.time() - t0
    if append and out is None:
        from clus_jax.train.metrics_writer import MetricWriter

        writer = MetricWriter(source, tensorboard=False)
        writer.write(step, results)
        writer.close()
    return step, results


def _run_model(workdir: str, step: int | None, batch_size: int):
    """(model, its step, ``params_of`` reading each objective's own parameters from that checkpoint)."""
    from clus_jax.inference import load
    from clus_jax.objectives import teachers

    model = load(workdir, step, batch_size=batch_size)
    step = int(model.step if model.step is not None else step or 0)
    saved = teachers.saved_param_shapes(workdir, step)

    def params_of(name: str):
        return teachers.load_params(workdir, step, include=(name,))[name] if name in saved else {}

    return model, step, params_of
