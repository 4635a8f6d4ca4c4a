"""LiT (Zhai et al. 2022): a frozen, pre-trained image tower and a text tower trained from scratch with CLIP.

Everything LiT needs is three config lines: ``init_from`` loads the image tower (and its projection) of a
finished run, a parameter group freezes it for the whole run (no gradient, no optimizer state, no weight
decay: the compiled step has no image backward pass), and ``clip`` trains the rest.

Command (CPU; first a source run, then the LiT stage on top of it, each about 2 minutes on 2 cores):
  python -m clus_jax.train --config configs/clip.py --workdir /tmp/clus_jax/clip
  python -m clus_jax.train --config configs/lit.py:init=/tmp/clus_jax/clip --workdir /tmp/clus_jax/lit

Expected result: the image tower's parameters at the end are bit-identical to the source run's; the
linear probe (frozen image features) equals the source's; zero-shot and retrieval come from the new text
tower alone.

Arguments (``--config configs/lit.py:ARGS``):
  init=WORKDIR   the run whose image tower is loaded (required)
  step=N         which of its checkpoints (-1 = newest)
  size=, text_size=, steps=, batch=, synthetic, image_size=   as in configs/clip.py (sizes must match the source)
Any key can also be overridden, e.g. unfreeze the projection: --config.init_from.include='^image/'
"""
from clus_jax.config import base as common

IMAGE_TOWER = r"^image(_proj)?/"


def get_config(arg: str | None = None):
    a = common.parse_arg(arg, init="", step=-1, size="", text_size="", steps=0, batch=0, synthetic=False, image_size=0)
    config = common.base_config()
    config.objectives = {"clip": 1.0}
    config.init_from.path = a.init
    config.init_from.step = a.step
    config.init_from.include = IMAGE_TOWER  # the text tower and the logit scale start fresh
    config.param_groups = [(IMAGE_TOWER, {"frozen": True})]
    common.apply_args(config, a)
    return config
