"""Clus (CLIP + cross-modal clustering swap prediction) on the embedded emoji + shapes dataset.

loss = CLIP + 0.5 * swap. The CLIP term is the reconstruction's, not the paper's, and so is the weight 0.5 (the
paper's full text is not public; its abstract names only the swap prediction). swap is the cross-modal SwAV loss
over two prototype banks (64 and 256 clusters, losses averaged): the text's Sinkhorn codes supervise the image's
prototype predictions and the other way round, with the codes coming from an EMA teacher of both towers and banks
(momentum 0.99, cosine to 1.0), or from a frozen teacher (teacher= below). Prototypes are frozen for the first
tenth of the run (at most 50 steps). Which parts follow the Clus paper and which are a reconstruction is written
in clus_jax/objectives/swap.py.

Command (CPU; 600 steps of batch 128 by default). A step costs more than configs/clip.py's: the swap loss
itself adds 1-6% (measured, BENCHMARKS train-step table), and the EMA teacher adds a forward pass of both towers,
estimated at about a third of a forward-backward step (not measured alone; the methods table's wall times, on
shared cores, are 426 s against CLIP's 305 s):
  python -m clus_jax.train --config configs/clus.py --workdir /tmp/clus_jax/clus

Expected result at equal compute (bench/methods.py --methods clip,clus,swap,clus_teacher: 400 steps of batch
128, the current towers, seeds 0-2, mean +- sample std, 2026-12-06; BENCHMARKS 'Methods at equal compute'):
  metric                        clip             clus (EMA)       swap alone       clus_teacher
  zeroshot/easyvqa/top1         0.934 +- 0.025   0.901 +- 0.042   0.047 +- 0.011   0.917 +- 0.030
  retrieval/emoji_heldout/i2t   0.169 +- 0.018   0.150 +- 0.018   0.036 +- 0.014   0.174 +- 0.019   (R@10)
  retrieval/emoji_heldout/t2i   0.218 +- 0.044   0.197 +- 0.059   0.036 +- 0.009   0.210 +- 0.037   (R@10)
  probe/easyvqa/linear_top1     0.899 +- 0.026   0.871 +- 0.032   0.571 +- 0.011   0.885 +- 0.038
Clus (EMA teacher) is below CLIP in every seed on easy-VQA and held-out i2t R@10, inside one std; the swap term
alone leaves zero-shot and retrieval at chance (0.042 and 0.047): the CLIP term carries the alignment.
clus_teacher (teacher= the default CLIP run, configs/clip.py at 600 steps of batch 64, trained once, its cost
apart) is level with CLIP and above EMA Clus on i2t R@10 in every seed. With the earlier towers (2026-12-01)
Clus was level with CLIP (i2t R@10 0.148 +- 0.023 against 0.147 +- 0.021).

These defaults are the best of the knob sweep with the earlier towers (get_sweep below: swap weight, bank sizes,
teacher and its momentum, queue, epsilon, temperature, prototype freezing, one at a time at seed 0; BENCHMARKS
'Clus knob sweep'): no knob lifted held-out retrieval beyond the seed spread, removing the teacher costs the most.
  python -m clus_jax.sweep --config configs/clus.py:steps=400,batch=128 --workdir /tmp/clus_jax/clus_sweep

Arguments (``--config configs/clus.py:ARGS``):
  size=B/16      image tower by name (text tower follows text_size=...)
  steps=N        total steps (the prototype freeze shrinks to at most a tenth of them)
  batch=N        global batch size
  synthetic      random data instead of the embedded dataset
  weight=W       weight of the swap loss next to CLIP (0.5)
  protos=A+B     prototype bank sizes, '+'-separated (64+256)
  clip=W         weight of the CLIP term (1.0; 0 = the swap term alone, CLIP's loss still logged)
  teacher=T      'ema' (default), 'none' (SwAV: the student's own codes), 'checkpoint' (with
                 --config.swap.teacher_checkpoint=WORKDIR, a run of the student's shape), or the PATH of a
                 frozen teacher with towers of its own: a finished run (workdir) or an open_clip checkpoint
                 (a .safetensors/.pt file with teacher_config=, or a folder holding open_clip_config.json).
                 Its config.model becomes config.swap.teacher_model and its tokenizer the student's; it
                 scores with its own banks when it saved some (a Clus run), else with banks initialised and
                 kept frozen (config.swap.teacher_prototypes='random'). The student's towers, steps and batch
                 stay this config's, so the student costs what configs/clip.py costs, plus the teacher's
                 forward (counted in the step's FLOPs) and, separately, the teacher's own training.
  teacher_config=PATH  the open_clip model config of a teacher weights file (e.g. ViT-B-32.json)
  teacher_step=N the teacher run's saved step (-1 = newest)
  queue=N        SwAV feature queue length, a multiple of the batch (0 = off); starts at step 100
Any key can also be overridden: --config.swap.epsilon=0.03 --config.swap.within_modality_weight=0.5

Measurements (3 seeds each, 400 steps of batch 128, the default towers; each run ends with the evaluation;
bench/methods.py runs them as the rows clip, clus, swap and clus_teacher):
  swap alone:     configs/clus.py:steps=400,batch=128,clip=0
  CLIP + swap:    configs/clus.py:steps=400,batch=128
  CLIP:           configs/clip.py:steps=400,batch=128
  teacher:        python -m clus_jax.train --config configs/clip.py --workdir /tmp/clus_jax/clip_teacher
                      (once: the default CLIP run; its cost counts separately)
  distilled:      configs/clus.py:steps=400,batch=128,teacher=/tmp/clus_jax/clip_teacher
  larger towers:  a teacher of other sizes works the same way (e.g. configs/clus.py:size=tiny,text_size=tiny
                  trained once), tested on tiny sizes, not measured
each as: python -m clus_jax.train --config CONFIG --config.seed=S --workdir /tmp/clus_jax/NAME_sS   (S = 0, 1, 2)
"""
from clus_jax.config import base as common
from clus_jax.objectives.swap import TEACHERS


def get_config(arg: str | None = None):
    a = common.parse_arg(arg, size="", text_size="", steps=0, batch=0, synthetic=False, image_size=0,
                         weight=0.5, clip=1.0, protos="64+256", teacher="ema", teacher_config="", teacher_step=-1,
                         queue=0)
    config = common.base_config()
    config.objectives = {"clip": a.clip, "swap": a.weight}
    config.swap.num_prototypes = [int(k) for k in a.protos.split("+")]
    config.swap.update(dict(
        temperature=0.1, epsilon=0.05, sinkhorn_iters=3,
        freeze_prototypes_steps=50,
        teacher=a.teacher if a.teacher in TEACHERS else "checkpoint", teacher_momentum=0.99, teacher_momentum_final=1.0,
        queue_length=a.queue, queue_start_step=100,
    ))
    common.apply_args(config, a)
    if a.teacher not in TEACHERS:  # a path: a frozen teacher with towers of its own
        from clus_jax.train import teacher_sources

        teacher_sources.use_frozen_teacher(config, a.teacher, a.teacher_config, a.teacher_step)
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
