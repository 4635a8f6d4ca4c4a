"""Clus (CLIP + cross-modal clustering swap prediction) on the embedded emoji + shapes dataset.

loss = CLIP + 0.5 * swap, where swap is the cross-modal SwAV loss over two prototype banks (64 and
256 clusters, losses averaged): the text's Sinkhorn codes supervise the image's prototype predictions
and the other way round, with the codes coming from an EMA teacher of both towers and banks (momentum
0.99, cosine to 1.0). Prototypes are frozen for the first tenth of the run (at most 50 steps). Which
parts follow the Clus paper and which are a reconstruction is written in clus_jax/objectives/swap.py.

Command (CPU, about 4.5 minutes of compute on 2 cores, 20% more than configs/clip.py: a teacher forward
and the swap loss on top of the same 400 steps of batch 128):
  python -m clus_jax.train --config configs/clus.py --workdir /tmp/clus_jax/clus

Expected result (measured with the earlier default towers: model.image.patch_size=8, conv_stem=(),
config.param_groups=[]; BENCHMARKS 'Methods at equal compute' has the current ones; on dataset v3,
seed 0, next to configs/clip.py at the same seed, batch and steps,
both from bench/methods.py): trains without NaN; train/swap/loss falls from 5.0 to 4.5 (the mean of ln 64 =
4.2 and ln 256 = 5.5 is 4.9: clusters only start to form in 400 steps); every bank keeps using many clusters
(train/swap/bank_*/used_clusters_* 22-48 per batch of 128, far from collapse at 1); train/clip/loss 2.6.
  metric                               clus    clip
  zeroshot/easyvqa/top1                0.41    0.42
  zeroshot/emoji_category/top1         0.25    0.22
  retrieval/emoji_heldout/i2t_r1       0.019   0.024
  retrieval/emoji_heldout/t2i_r1       0.013   0.009
  retrieval/emoji_heldout/t2i_r10      0.18    0.16
  retrieval/emoji_openmoji/i2t_r10     0.025   0.018
  probe/easyvqa/linear_top1            0.39    0.41
  cluster/easyvqa/kmeans_nmi           0.68    0.68   (bank_1 argmax: 0.61)
Seed 0 above; over seeds 0-2 (bench/methods.py) held-out i2t R@10 is 0.152 +- 0.016 for Clus and 0.153 +- 0.028
for CLIP, t2i R@10 0.163 +- 0.024 and 0.159 +- 0.033, easy-VQA 0.408 +- 0.022 and 0.417 +- 0.021.

Arguments (``--config configs/clus.py:ARGS``):
  size=B/16      image tower by name (text tower follows text_size=...)
  steps=N        total steps (the prototype freeze shrinks to at most a tenth of them)
  batch=N        global batch size
  synthetic      random data instead of the embedded dataset
  weight=W       weight of the swap loss next to CLIP (0.5)
  protos=A+B     prototype bank sizes, '+'-separated (64+256)
  teacher=T      'ema' (default), 'none' (SwAV: the student's own codes) or 'checkpoint' (with
                 --config.swap.teacher_checkpoint=WORKDIR)
  queue=N        SwAV feature queue length, a multiple of the batch (0 = off); starts at step 100
Any key can also be overridden: --config.swap.epsilon=0.03 --config.swap.within_modality_weight=0.5
"""
from clus_jax import config_base as common


def get_config(arg: str | None = None):
    a = common.parse_arg(arg, size="", text_size="", steps=0, batch=0, synthetic=False, image_size=0,
                         weight=0.5, protos="64+256", teacher="ema", queue=0)
    config = common.base_config()
    config.objectives = {"clip": 1.0, "swap": a.weight}
    config.swap.num_prototypes = [int(k) for k in a.protos.split("+")]
    config.swap.update(dict(
        temperature=0.1, epsilon=0.05, sinkhorn_iters=3,
        freeze_prototypes_steps=50,
        teacher=a.teacher, teacher_momentum=0.99, teacher_momentum_final=1.0,
        queue_length=a.queue, queue_start_step=100,
    ))
    common.apply_args(config, a)
    config.swap.freeze_prototypes_steps = min(config.swap.freeze_prototypes_steps, config.total_steps // 10)
    return config


def get_sweep(arg: str | None = None):
    """Clus's knobs one at a time around the default (BENCHMARKS 'Clus knob sweep'):
    python -m clus_jax.sweep --config configs/clus.py:steps=400,batch=128 --workdir DIR"""
    del arg
    return [
        {},
        {"objectives.swap": 0.25},
        {"objectives.swap": 1.0},
        {"swap.num_prototypes": (24, 64)},
        {"swap.num_prototypes": (256, 1024)},
        {"swap.teacher": "none"},
        {"swap.teacher_momentum": 0.999},
        {"swap.queue_length": 1024},
        {"swap.epsilon": 0.02},
        {"swap.epsilon": 0.1},
        {"swap.temperature": 0.2},
        {"swap.freeze_prototypes_steps": 0},
    ]
