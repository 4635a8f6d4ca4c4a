"""BriVL (cross-modal MoCo: momentum towers, two key queues) on the embedded emoji + shapes dataset.

loss = InfoNCE(image queries vs text keys + text queue) + InfoNCE(text queries vs image keys + image
queue), keys from momentum copies of both towers (m = 0.99), fixed temperature 0.07. What follows
BriVL's released code and what is a choice is written in clus_jax/objectives/moco.py.

Command (CPU, 2 cores; the default is the small-batch setting where the queues supply most negatives):
  python -m clus_jax.train --config configs/brivl.py --workdir /tmp/clus_jax/brivl
and the same budget without queues, for comparison:
  python -m clus_jax.train --config configs/clip.py:batch=32 --workdir /tmp/clus_jax/clip_b32

Expected result (measured with the earlier default towers: model.image.patch_size=8, conv_stem=(),
config.param_groups=[]; BENCHMARKS 'Methods at equal compute' has the current ones; 400 steps of
batch 32, one seed each; retrieval on the 211 held-out emoji concepts, chance R@1 0.005, R@10 0.047):

  run                                  easyVQA zero-shot  i2t R@1  t2i R@1  i2t R@10  t2i R@10  probe
  clip, batch 32                              0.25          0.024    0.013    0.128     0.070   0.44
  brivl (this config: queue 4096)             0.13          0.005    0.004    0.057     0.044   0.40
  brivl, queue 1024                           0.13          0.000    0.009    0.066     0.061   0.39
  brivl, queue 1024, m = 0.999                0.16          0.005    0.000    0.043     0.105   0.40
  from a clip batch-32 run, +400 steps:
    clip                                      0.42          0.033    0.022    0.180     0.157   0.46
    brivl                                     0.34          0.028    0.035    0.166     0.183   0.43

From random towers BriVL trails CLIP in so short a run: the queue fills with keys of towers that have
moved since (train/brivl/queue_cosine falls to -0.46 while the queue still holds keys from 100 steps
back), and the many repeated easy-VQA captions are false negatives in a queue of thousands (the
multi-label positives, topk=32 or 128, made it worse). Started from pre-trained towers, as BriVL itself
is (ImageNet EfficientNet, RoBERTa), it is level with CLIP on held-out retrieval.

Arguments (``--config configs/brivl.py:ARGS``):
  batch=N        global batch size (32: a queue of 4096 is 128 batches of negatives)
  queue=N        queue length per modality, a multiple of the batch (4096)
  topk=K         BriVL's multi-label positives (0 = off, as in its code)
  size=, text_size=, steps=, synthetic, image_size=   as in configs/clip.py
Any key can also be overridden: --config.brivl.momentum=0.995 --config.brivl.learnable_temperature=True
"""
from clus_jax.config import base as common


def get_config(arg: str | None = None):
    a = common.parse_arg(arg, size="", text_size="", steps=0, batch=32, synthetic=False, image_size=0, queue=4096, topk=0)
    config = common.base_config()
    config.objectives = {"brivl": 1.0}
    config.brivl.update(dict(queue_length=a.queue, momentum=0.99, momentum_final=0.99, temperature=0.07,
                             multi_label_topk=a.topk))
    common.apply_args(config, a)
    return config


def get_sweep(arg: str | None = None):
    """Queue length and momentum: python -m clus_jax.sweep --config configs/brivl.py --workdir DIR"""
    del arg
    return [{"brivl.queue_length": q, "brivl.momentum": m} for q in (1024, 4096) for m in (0.99, 0.995)]
