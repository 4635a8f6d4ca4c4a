"""SigLIP (pairwise sigmoid loss, Zhai et al. 2023) on the embedded dataset.

Command (CPU, about 3-5 minutes):
  python -m clus_jax.train --config configs/siglip.py --workdir /tmp/clus_jax/siglip

Expected result: trains without NaN; zero-shot easy-VQA well above the 4.2% chance level.
The learnable bias starts at -10 and the scale at 10 (log 10), as in the paper.
"""
import math

from clus_jax.config import base as common


def get_config(arg: str | None = None):
    a = common.parse_arg(arg, size="", text_size="", steps=0, batch=0, synthetic=False, image_size=0)
    config = common.base_config()
    config.objectives = {"siglip": 1.0}
    config.model.logit_scale_init = math.log(10.0)
    config.model.logit_bias_init = -10.0
    common.apply_args(config, a)
    return config
