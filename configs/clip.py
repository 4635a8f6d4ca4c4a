"""CLIP (softmax contrastive) on the embedded emoji + shapes dataset: the default pre-training run.

Command (CPU, builds the dataset on first use):
  python -m clus_jax.train --config configs/clip.py --workdir /tmp/clus_jax/clip

Expected final metrics (600 steps of batch 64; seeds 0 / 1 / 2; chance in brackets):
  zeroshot/easyvqa/top1           0.937 / 0.921 / 0.859  (0.042)
  zeroshot/emoji_category/top1    0.21 / 0.20 / 0.17  (0.11)
  retrieval/emoji_heldout/i2t_r1  0.028 / 0.033 / 0.043 (1/211 = 0.0047), i2t_r10 0.19 / 0.17 / 0.18 (0.047)
  retrieval/emoji_openmoji/i2t_r10 0.022 / 0.017 / 0.017 (10/1898 = 0.0053)
  probe/easyvqa/linear_top1       0.92 / 0.90 / 0.86
final train/loss 1.29 / 1.29 / 1.33. Wall time: see the README's quick start (measured there on a fresh clone).

The run costs a third of the FLOPs of the earlier default (600 steps of batch 128, image MLP 4x the
width, 4 text blocks, random crops of area >= 0.5: easy-VQA 0.95 / 0.95), measured step by step in
BENCHMARKS.md ("The default run at a third of the compute"): batch 64 gives twice the updates per image
(0.90 where 300 steps of batch 128 give 0.66), no crop keeps easy-VQA's shapes whole (0.92), and the
cheaper nano towers (clus_jax/models/sizes.py) lose nothing (0.92, then 0.94).

Two defaults of clus_jax/config/base.py make easy-VQA's shapes learnable (the colour alone gives 1/3 of top-1):
  * the image tower: 8x8 tokens from a (32, 64) convolutional stem (model.image.patch_size=4,
    model.image.conv_stem). With the labels, in this budget, the plain 8-pixel patches reach 0.53 top-1
    and the stem 0.94 (bench/supervised_ceiling.py): the old tower could not see the shapes.
  * the text tower at 0.03x the learning rate (config.param_groups). At one rate it maps "a red circle"
    and "a red rectangle" to one embedding (cosine 0.99) while colour is learned, and neither tower then
    gets a gradient along the shape; zero-shot stays at the colour. Easy-VQA top-1 after 400 steps of
    batch 128 with the stem (earlier towers): text lr x1 0.40, x0.3 0.53, x0.1 0.80, x0.03 0.89; text
    frozen at its random init 0.71; frozen for 100 steps, then x1, 0.59 (but held-out R@10 0.26). At
    batch 64: x0.02 0.88, x0.05 0.85 against 0.90 at x0.03.
Measured alternatives that did not help (400 steps of 128, stem): logit scale initialised at 50 (0.39),
lr 2e-3 (0.38; 0.87 against 0.90 at batch 64), a third of the shape captions without the colour (0.32),
1000 steps at x1 (0.46 at step 500); batch 32 for 1200 steps (0.84).

Arguments (``--config configs/clip.py:ARGS``):
  size=B/16      image tower by name (text tower follows text_size=...)
  steps=N        total steps
  batch=N        global batch size
  synthetic      random data instead of the embedded dataset (no build step)
  text_lr_mult=X the text tower's learning rate, x the schedule (default 0.03; 1 = one rate)
Any key can also be overridden: --config.optim.lr=3e-4 --config.mesh.fsdp=2
"""
from clus_jax.config import base as common


def get_config(arg: str | None = None):
    a = common.parse_arg(arg, size="", text_size="", steps=0, batch=0, synthetic=False, image_size=0,
                         text_lr_mult=0.0)
    config = common.base_config()
    config.objectives = {"clip": 1.0}
    # Twice the updates per image of base_config's batch 128: 600 steps of 64 reach easy-VQA 0.90 where 300
    # steps of 128 reach 0.66, at the same compute (BENCHMARKS.md, "The default run at a third of the compute").
    config.batch_size = 64
    common.apply_args(config, a)
    return config


def get_sweep(arg: str | None = None):
    """Learning-rate sweep: python -m clus_jax.sweep --config configs/clip.py[:ARGS] --workdir DIR"""
    del arg
    return [{"optim.lr": lr} for lr in (3e-3, 1e-3, 3e-4)]
