"""Evaluation of image and text embeddings: ``registry`` (evaluators by name, run by ``config.evals``),
``embedded`` (the default evaluator), ``metrics`` (pure functions), ``cluster_eval`` (cluster quality),
``runner`` (sets -> flat metric names), ``artifacts`` (an evaluation's arrays on disk), ``encoders``
(sharded encode functions); ``python -m clus_jax.evaluate WORKDIR`` re-evaluates a run (``__main__``)."""
