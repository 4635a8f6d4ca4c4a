"""CLIP (softmax contrastive) on the embedded emoji + shapes dataset: the default pre-training run.

Command (CPU, about 3 minutes on 2 cores, builds the dataset in a few seconds on first use):
  python -m clus_jax.train --config configs/clip.py --workdir /tmp/clus_jax/clip

Expected result (400 steps, batch 128): zeroshot/easyvqa/top1 about 0.41 (chance 0.042),
zeroshot/emoji_category/top1 about 0.19 (chance 0.11), retrieval/emoji_heldout/t2i_r10 about 0.20
(chance 0.047); final train/loss about 2.4.

Arguments (``--config configs/clip.py:ARGS``):
  size=B/16      image tower by name (text tower follows text_size=...)
  steps=N        total steps
  batch=N        global batch size
  synthetic      random data instead of the embedded dataset (no build step)
Any key can also be overridden: --config.optim.lr=3e-4 --config.mesh.fsdp=2
"""
from clus_jax import config_base as common


def get_config(arg: str | None = None):
    a = common.parse_arg(arg, size="", text_size="", steps=0, batch=0, synthetic=False, image_size=0)
    config = common.base_config()
    config.objectives = {"clip": 1.0}
    common.apply_args(config, a)
    return config


def get_sweep(arg: str | None = None):
    """Learning-rate sweep: python -m clus_jax.sweep --config configs/clip.py[:ARGS] --workdir DIR"""
    del arg
    return [{"optim.lr": lr} for lr in (3e-3, 1e-3, 3e-4)]
