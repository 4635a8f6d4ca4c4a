"""The ``embedded`` evaluator: the evaluation sets of the offline default dataset (``clus_jax.data.embedded``)
that the run's towers can be scored on (``runner.sets_for``), through ``runner.run`` with the objectives' heads.

``config.evals.embedded = {'type': 'embedded'}`` is the default entry; its one setting is ``knn_k``, the
neighbours of the k-NN probe. Metric names: ``runner``'s docstring, plus ``eval/nonfinite_embeddings``: how
many encoder output rows had a NaN or inf (scored as wrong, never as right), 0 in a healthy run.
"""
from __future__ import annotations

import numbers

import ml_collections

from clus_jax.common.errors import ConfigError
from clus_jax.evaluate import registry, runner

#: The metric counting the non-finite embeddings of an evaluation.
NONFINITE_KEY = "eval/nonfinite_embeddings"


def load_sets(config: ml_collections.ConfigDict) -> list[runner.EvalSet]:
    """The embedded dataset's evaluation sets at the run's image size (built on first use, cached in memory)."""
    from clus_jax.data.embedded_eval import load_eval_sets

    return load_eval_sets(image_size=int(config.model.image.image_size),
                          cache_dir=config.data.get("cache_dir") or None)


@registry.register
class Embedded(registry.Evaluator):
    """Zero-shot, retrieval, probes and cluster quality on the embedded dataset's sets."""

    name = "embedded"
    defaults = {"knn_k": 20}

    def validate(self, settings: ml_collections.ConfigDict, config: ml_collections.ConfigDict) -> None:
        k = settings.knn_k
        if not isinstance(k, numbers.Integral) or isinstance(k, bool) or k < 1:
            raise ConfigError(f"config.evals.{settings.entry}.knn_k={k!r} must be an integer >= 1")

    def run(self, settings: ml_collections.ConfigDict, ctx: registry.EvalContext) -> runner.Evaluation:
        sets = runner.sets_for(load_sets(ctx.config), ctx.modalities)
        out = runner.run(sets, ctx.encode_images, ctx.encode_texts, knn_k=int(settings.knn_k), heads=ctx.heads)
        out.metrics[NONFINITE_KEY] = float(out.nonfinite_embeddings)
        return out
