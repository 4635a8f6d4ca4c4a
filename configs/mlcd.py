"""MLCD (An, Yang, Dai, Feng, Deng, ECCV 2024): multi-label cluster discrimination, as a recipe on the embedded data.

MLCD replaces CLIP's instance discrimination by classification against k-means centres: every image takes
its l = 8 nearest centres as positive labels and the image tower learns
log(1 + sum_pos exp(-s cos(theta + m))) + log(1 + sum_neg exp(s cos theta)) against a normalised classifier
(clus_jax/objectives/mlcd.py says what follows the paper and unicom and what is a choice). Text comes
afterwards: the image tower is frozen and a text tower is trained from scratch with CLIP (LiT).

The whole method, one command (stages in DIR/<name>, a re-run skips finished ones):
  python -m clus_jax.recipe --config configs/mlcd.py --workdir /tmp/clus_jax/mlcd

Which tower trains from what. As in the paper (k-means of the features of an off-the-shelf CLIP ViT-L/14,
then a ViT trained from scratch on the labels, then a text tower from scratch against it), the teacher only
labels the data; no weight of it reaches the student:
  teacher  python -m clus_jax.train --config configs/clip.py      a CLIP at its own full length (600 steps of
           batch 64), both towers from random init; skipped with teacher=DIR: any finished run or an
           open_clip checkpoint folder (open_clip_config.json + weights), of any size
  embed    python -m clus_jax.embed --workdir {teacher} --modality image   the teacher's image embeddings of
           the student's training records (--data.source: the student's)
  cluster  python -m clus_jax.cluster --k 256 --metric cosine --topk 8 ...   centres + top-8 labels side file
  mlcd     python -m clus_jax.train --config configs/mlcd.py   the student's image tower from random
           initialisation (no init_from), with the K centres; batches hold no text
  lit      python -m clus_jax.train --config configs/lit.py:init={mlcd}   the mlcd tower frozen, a text tower
           from random initialisation
Every train stage ends with the evaluation (zero-shot, retrieval, linear probe, k-NN). The teacher and embed
stages take no seed= and none of the student's sizes, so they run once per DIR; with seed=S the other stages
are cluster_sS, mlcd_sS and lit_sS, so the seeds run side by side beside one teacher and one embedding:
  for s in 0 1 2; do python -m clus_jax.recipe --config configs/mlcd.py:seed=$s --workdir /tmp/clus_jax/mlcd; done

Cost. The student's: the mlcd and lit stages, by default 600 steps of batch 128 each (steps= and lit_steps=),
and one k-means per seed. The teacher's is counted apart, once: 600 CLIP steps of batch 64 and one pass of
its image tower over the 7,370 training images, shared by every seed (and by every K: bench/mlcd_ablation.py).
The paper does not count the training of the CLIP it clusters with either. bench/methods.py gives the mlcd
and lit stages together the steps of one CLIP run and reports the teacher in a row of its own.

The MLCD stage alone, on labels made elsewhere (a side file of cluster_labels int32 [8] keyed by record index,
as python -m clus_jax.cluster --topk 8 --assign-to DIR writes it):
  python -m clus_jax.train --config configs/mlcd.py --workdir /tmp/clus_jax/mlcd_only \\
      --config.data.side_fields.cluster_labels=DIR/labels --config.mlcd.init_centers=DIR

K = 256 for 7,370 training images: about 29 images per centre (the paper has about 400 at 1M centres
for 400M images, but at K = 1,024 here a centre would hold 7 images, fewer than the 8 labels an image
takes), so the 8 positives of an image are its neighbourhood, not near-duplicates. With K = 256 the
negative sampling of Partial-FC is off (sample_rate 1.0): a batch of 128 images already holds about a
thousand positive labels, more than r K = 26 sampled centres; r = 0.1 is for K far above the positives of a
batch (bench/mlcd_ablation.py compares r = 1.0 and 0.1 at K = 2,048 with one label per image). The
centres start from the k-means centres (init=0: unicom's random init). They lie in the teacher's embedding
space, which the random student does not share: to it they are K spread-out unit vectors, and they need
the teacher's embedding width to equal the student's (else init=0; the recipe says so before it runs).

Ablations (python bench/mlcd_ablation.py: the paper's Table 5 at this scale; BENCHMARKS.md has the detail).
The default teacher (configs/clip.py, 600 steps of batch 64; its own easy-VQA probe 0.916) labels the
data once; each row is the MLCD stage alone from random initialisation, 200 steps of batch 128, seeds 0-2,
easy-VQA linear probe and k-NN of the image tower (chance 0.042), mean +- sample std, 2026-12-06:
  row         K      l  r    margin  linear probe    k-NN
  base        256    8  1.0  0.3     0.781 +- 0.041  0.865 +- 0.033
  l1          256    1  1.0  0.3     0.750 +- 0.007  0.804 +- 0.023
  margin0     256    8  1.0  0.0     0.782 +- 0.035  0.864 +- 0.028
  k2048_r1    2,048  1  1.0  0.3     0.728 +- 0.033  0.696 +- 0.087
  k2048_r01   2,048  1  0.1  0.3     0.698 +- 0.030  0.657 +- 0.105
l = 8 beats l = 1 on k-NN in every seed; on the linear probe it is 0.031 higher on average, inside the
spread of the l = 8 runs (one seed of three lower). At K = 2,048 sampling drops centres (r = 0.1 scores
204: the ~124 positives of a batch and ~80 of the ~1,924 negatives) and is lower in every seed, against the
paper's gain at 1M centres of ~400 images each. The margin (0 vs 0.3) makes no difference here.

Expected result (python bench/methods.py --methods clip,mlcd: the mlcd stage 300 steps and lit 100 steps of batch
128, labels from the default CLIP run, seeds 0-2, 2026-12-06; BENCHMARKS 'Methods at equal compute'), LiT stage:
  metric                             mlcd             clip (400 steps)
  zeroshot/easyvqa/top1              0.913 +- 0.019   0.934 +- 0.025
  zeroshot/emoji_category/top1       0.284 +- 0.021   0.178 +- 0.007
  retrieval/emoji_heldout/i2t_r10    0.265 +- 0.036   0.169 +- 0.018
  retrieval/emoji_heldout/t2i_r10    0.339 +- 0.018   0.218 +- 0.044
  probe/easyvqa/linear_top1          0.851 +- 0.012   0.899 +- 0.026
MLCD is above CLIP on held-out-concept retrieval in every seed (and above its teacher's 0.190 / 0.240), below on
easy-VQA zero-shot and the probe. The teacher's 600 x 64 CLIP steps are not in the budget (nor in the paper's).
An earlier form of this recipe (labels from a 100-step CLIP of the student's size inside the student's 400
steps) gave i2t R@10 0.207 and easy-VQA 0.402: its labels saw colour and barely shape.

Arguments (``--config configs/mlcd.py:ARGS``, for both get_config and get_recipe):
  k=N            number of centres (256)          labels=L     positives per image (8)
  teacher=DIR    the run or open_clip checkpoint folder to embed with (default: the recipe's teacher stage);
                 features=DIR is its earlier name
  teacher_steps=N   steps of the recipe's teacher stage (default: configs/clip.py's own, 600)
  init=0         random centres instead of the k-means centres
  lit_steps=N    steps of the lit stage (default: steps=, as the mlcd stage)
  seed=S         seed of the mlcd and lit stages and of k-means (default: the configs' own); not the teacher's
  size=, text_size=, steps=, batch=, synthetic, image_size=   the student's, as in configs/clip.py
                 (synthetic also trains the default teacher on, and embeds, the synthetic records)
Any key can also be overridden: --config.mlcd.scale=64 --config.mlcd.margin=0.5 --config.mlcd.sample_rate=0.1
"""
from clus_jax.config import base as common

ARGS = dict(k=256, labels=8, teacher="", features="", teacher_steps=0, init=True, size="", text_size="", steps=0,
            batch=0, synthetic=False, image_size=0, lit_steps=0, seed=-1)
TEACHER = "configs/clip.py"  # the default teacher, at its own length


def get_config(arg: str | None = None):
    """The MLCD training stage: image batches with cluster_labels from a side file; the towers from random init."""
    a = common.parse_arg(arg, **ARGS)
    config = common.base_config()
    config.objectives = {"mlcd": 1.0}
    config.mlcd.update(dict(num_classes=a.k, num_labels=a.labels, sample_rate=1.0, scale=32.0, margin=0.3,
                            lr_mult=5.0))
    config.data.side_fields = {"cluster_labels": ""}  # --config.data.side_fields.cluster_labels=DIR
    common.apply_args(config, a)
    return config


def teacher_width(path: str) -> int:
    """The embedding width of a teacher: a finished run (its config.json) or an open_clip checkpoint folder.

    Raises ValueError naming ``teacher=`` for a path that is neither (an open_clip weights file needs its
    model config, which the recipe has no argument for: the folder holds both).
    """
    import os

    from clus_jax.config.run_config import CONFIG_FILE, load_run_config
    from clus_jax.interop import open_clip

    if open_clip.is_source(path) and os.path.isdir(path):
        return int(open_clip.resolve(path)[1]["embed_dim"])
    if open_clip.is_source(path):
        raise ValueError(f"teacher={path}: an open_clip weights file; give the folder that holds it and its "
                         "open_clip_config.json")
    try:
        return int(load_run_config(path).model.embed_dim)
    except FileNotFoundError:
        raise ValueError(f"teacher={path}: neither a clus_jax run (no {CONFIG_FILE} there) nor an open_clip "
                         "checkpoint folder (no open_clip_config.json)") from None


def get_recipe(arg: str | None = None):
    """teacher (clip at its own length, or teacher=DIR) -> embed -> cluster (k-means, top-l labels) -> mlcd
    (the student's image tower from random init) -> lit."""
    from clus_jax.data.side_fields import CENTERS_FILE
    from clus_jax.recipe import Stage

    a = common.parse_arg(arg, **ARGS)
    if a.teacher and a.features and a.teacher != a.features:
        raise ValueError(f"teacher={a.teacher} and features={a.features}: features= is teacher='s earlier name; "
                         "give one")
    teacher = a.teacher or a.features
    if teacher and a.teacher_steps:
        raise ValueError(f"teacher_steps={a.teacher_steps} is for the recipe's own teacher stage; "
                         f"teacher={teacher} is already trained")
    shared = ",".join(f"{k}={a[k]}" for k in ("size", "text_size", "batch", "image_size") if a[k])
    shared += ",synthetic" if a.synthetic else ""

    def spec(path: str, steps: int, extra: str = "", args: str = shared) -> str:
        args = ",".join(filter(None, [extra, f"steps={steps}" if steps else "", args]))
        return f"{path}:{args}" if args else path

    # The teacher knows nothing of the student: no seed, no sizes, its own length (synthetic: the same records).
    teacher_spec = spec(TEACHER, a.teacher_steps, args="synthetic" if a.synthetic else "")
    student = get_config(arg)
    width = teacher_width(teacher) if teacher else common.load_config(teacher_spec).model.embed_dim
    if a.init and width != student.model.embed_dim:
        raise ValueError(f"init=1 starts the student's centres from the teacher's k-means centres, {width} wide, "
                         f"but the student embeds in {student.model.embed_dim}; pass init=0 (random centres)")
    data = [f"--data.source={student.data.source}"]  # the records the labels are keyed by: the student's
    if student.data.source == "synthetic":
        data.append(f"--data.synthetic_size={student.data.synthetic_size}")
    seeded = {"seed": a.seed} if a.seed >= 0 else {}
    suffix = f"_s{a.seed}" if a.seed >= 0 else ""
    cluster, mlcd = "cluster" + suffix, "mlcd" + suffix
    stages = [] if teacher else [Stage("teacher", train=teacher_spec)]
    stages += [
        Stage("embed", module="clus_jax.embed",
              args=["--workdir", teacher or "{teacher}", "--out", "{workdir}", "--modality", "image", *data]),
        Stage(cluster, module="clus_jax.cluster", outputs={"labels": "labels", "centers": CENTERS_FILE},
              args=["--features", "{embed}", "--field", "image_emb", "--k", str(a.k), "--metric", "cosine",
                    "--topk", str(a.labels), "--assign-to", "{workdir}/labels", "--out", "{workdir}",
                    *(["--seed", str(a.seed)] if a.seed >= 0 else [])]),
        Stage(mlcd, train=spec("configs/mlcd.py", a.steps, f"k={a.k},labels={a.labels}"),
              overrides={"data.side_fields.cluster_labels": f"{{{cluster}.labels}}",
                         **({"mlcd.init_centers": f"{{{cluster}.centers}}"} if a.init else {}), **seeded}),
        Stage("lit" + suffix, train=spec("configs/lit.py", a.lit_steps or a.steps, f"init={{{mlcd}}}"),
              overrides=seeded),
    ]
    return stages
