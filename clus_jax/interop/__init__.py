"""Pretrained weights in and out: open_clip checkpoints as clus_jax models and starting points, clus_jax runs
as open_clip files (``open_clip.py``; the config mapping in ``open_clip_config.py``, the tensors in
``open_clip_weights.py``)."""
from clus_jax.interop.open_clip import load_open_clip, run_config, save_open_clip
from clus_jax.interop.open_clip_config import UnsupportedConfig

__all__ = ["load_open_clip", "run_config", "save_open_clip", "UnsupportedConfig"]
