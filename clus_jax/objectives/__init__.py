"""Objectives: public loss functions usable on their own, and the registry the trainer sums by weight.

BriVL's functions (``moco.py``) are re-exported on first use: that module reads checkpoints (orbax), which
importing the package should not.
"""
from clus_jax.objectives.contrastive import clip_loss, clip_reg_loss, positive_pair_l2, siglip_loss
from clus_jax.objectives.mlcd_math import margin_softmax_loss, mlcd_loss
from clus_jax.objectives.partial_fc import sample_negatives
from clus_jax.objectives.registry import ConfigError, LossContext, Objective, get, names, register
from clus_jax.objectives.sinkhorn import sharded_sinkhorn_knopp, sinkhorn_knopp
from clus_jax.objectives.swap_math import cross_entropy_with_codes, swapped_prediction_loss

__all__ = [
    # Pure losses (each takes optional mesh axis names and runs inside jax.shard_map).
    "clip_loss", "clip_reg_loss", "cross_entropy_with_codes", "positive_pair_l2", "sharded_sinkhorn_knopp",
    "siglip_loss", "sinkhorn_knopp", "swapped_prediction_loss",
    # MLCD and UNICOM (their mesh axis splits the class centres; see clus_jax/objectives/mlcd.py).
    "margin_softmax_loss", "mlcd_loss", "sample_negatives",
    # BriVL's cross-modal MoCo: the loss, its key queue and momentum towers (moco.py, imported on first use).
    "brivl_loss", "enqueue", "moco_loss", "momentum_update",
    # The registry the trainer sums by weight.
    "ConfigError", "LossContext", "Objective", "get", "names", "register",
]


#: Names re-exported from ``moco.py`` when first read (``from clus_jax.objectives import moco_loss`` works).
_FROM_MOCO = ("brivl_loss", "enqueue", "moco_loss", "momentum_update")


def __getattr__(name: str) -> object:
    if name in _FROM_MOCO:
        from clus_jax.objectives import moco

        return getattr(moco, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
