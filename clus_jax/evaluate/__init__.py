"""Evaluation of image and text embeddings: ``metrics`` (pure functions), ``cluster_eval`` (cluster quality),
``runner`` (sets -> flat metric names), ``artifacts`` (an evaluation's arrays on disk), ``reevaluate``
(``python -m clus_jax.evaluate WORKDIR``) and ``datasets`` (the in-memory sets)."""
