"""Objectives: public loss functions usable on their own, and the registry the trainer sums by weight."""
from clus_jax.objectives.contrastive import clip_loss, clip_reg_loss, positive_pair_l2, siglip_loss
from clus_jax.objectives.registry import ConfigError, LossContext, Objective, get, names, register

__all__ = [
    "clip_loss", "clip_reg_loss", "positive_pair_l2", "siglip_loss",
    "ConfigError", "LossContext", "Objective", "get", "names", "register",
]
