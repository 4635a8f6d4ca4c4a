"""CLIP + positive-pair L2 regulariser (Chen, Deng, Li, Gu, ICLR 2024) on the embedded dataset.

loss = CLIP + reg_weight * mean_i ||g(x_i) - h(y_i)||^2 on L2-normalised matched pairs only. The paper
gives no value for the weight; 0.1 is a starting point (sweep 0.1-1.0).

Command (CPU, about 3-5 minutes):
  python -m clus_jax.train --config configs/clip_reg.py --workdir /tmp/clus_jax/clip_reg

Expected result: trains without NaN; higher positive-pair cosine (train/clip_reg/pos_cosine) than CLIP.
"""
from clus_jax.config import base as common


def get_config(arg: str | None = None):
    a = common.parse_arg(arg, size="", text_size="", steps=0, batch=0, synthetic=False, image_size=0, reg_weight=0.1)
    config = common.base_config()
    config.objectives = {"clip_reg": 1.0}
    config.clip_reg.reg_weight = a.reg_weight
    common.apply_args(config, a)
    return config
