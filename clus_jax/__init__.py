"""clus_jax: image-text pre-training by clustering and by contrast, in JAX/Flax (README.md is the map).

``clus_jax.load(workdir)`` gives a trained run's image and text encoders (``clus_jax.inference``).
Importing ``clus_jax`` stays cheap: nothing heavy is imported until it is used.
"""
from __future__ import annotations


def load(workdir_or_checkpoint: str, step: int | None = None, *, batch_size: int | None = None):
    """A trained model from a workdir, its ``checkpoints`` folder or one step's folder.

    Returns ``clus_jax.inference.Model`` with ``encode_image``, ``encode_text``, ``tokenize``, ``config`` and
    ``params``; see ``clus_jax.inference.load``.
    """
    from clus_jax.inference import load as load_model

    return load_model(workdir_or_checkpoint, step, batch_size=batch_size)
