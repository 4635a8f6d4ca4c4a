"""MoDE (Ma et al., CVPR 2024): CLIP data experts from a two-level clustering of the captions, trained from a
shared seed run and ensembled by task metadata. ``get_recipe`` is the whole method; ``get_config`` is the
CLIP run of any one stage (configs/clip.py's towers, data and optimizer).

Command (CPU, the recipe: embed captions -> cluster -> expert subsets -> seed -> experts -> dense baseline ->
ensemble evaluation; wall time to re-measure):
  python -m clus_jax.recipe --config configs/mode.py --workdir /tmp/clus_jax/mode
One stage alone, e.g. an expert resuming a finished seed run:
  python -m clus_jax.train --config configs/mode.py:steps=346 --workdir /tmp/clus_jax/mode/expert_0 \\
      --config.init_from.path=/tmp/clus_jax/mode/seed --config.init_from.mode=resume \\
      --config.data.subset=/tmp/clus_jax/mode/subsets/expert_0.npy

Stages (each in WORKDIR/<name>, skipped when done):
  captions     python -m clus_jax.embed --encoder minilm: all-MiniLM-L6-v2 embeddings of every caption
  clusters     python -m clus_jax.cluster --levels fine,coarse --balanced --balanced-coarse: balanced k-means of
               the captions into fine centres, then balanced k-means of the fine centres into coarse ones
               (fine / coarse fine centres each: MoDE's two steps), euclidean on unit features
  subsets      python -m clus_jax.experts: per coarse cluster the records whose *nearest* fine centre maps to
               it, plus 2% out-of-cluster records (seeded); written for every coarse cluster
  seed         CLIP from scratch on all data, steps 0 -> seed_steps of a (seed_steps + expert_steps)-step
               schedule (``schedule=``): 292 of 346 steps, 84% (MoDE: epoch 27 of 32)
  expert_<c>   resumes the seed (``init_from.mode='resume'``: its parameters, Adam moments and counts, step)
               on subset c, steps seed_steps -> seed_steps + expert_steps (292 -> 346): the schedule's tail,
               as MetaCLIP's quick_init. Its total_steps (346) is where the shared schedule ends, not the
               steps it trains (54); a checkpoint every expert_steps / 2, so an interrupted expert resumes
               from its own checkpoint. Independent runs (``python -m clus_jax.recipe ... --launcher
               tpu_pod`` prints one launcher command per stage)
  dense_<S>    CLIP from scratch on all data for S = seed_steps + experts x expert_steps steps on its own
               S-step schedule: the same total compute
  ensemble_<n> python -m clus_jax.ensemble: each expert, the best, the uniform average, the
               metadata ensemble and the dense baseline, in WORKDIR/ensemble_<n>/ensemble.md

Step accounting at the defaults (2 experts, batch 128): seed 292 + 2 x 54 expert steps = 400 train steps,
the dense baseline's 400; each expert's model has had 346 updates (292 shared, 54 its own), the seed 84% of
them. ``resume=0`` is the earlier form: each expert loads the seed's parameters alone and trains
expert_steps on a fresh optimizer with a new warm-up and a full cosine, the seed then being a whole
seed_steps-step schedule.

Caption encoder: MiniLM (``encoder=minilm``, the default), MoDE's SimCSE stand-in. MoDE chose a sentence
encoder because it clustered better than CLIP's own text embeddings (paper Sec. 5.3), and it does not depend
on the seed: the clustering runs before any training and the experts' data is fixed whatever the seed
learns. ``encoder=seed`` embeds the captions with the seed run's text tower instead (the stages then run
seed -> captions -> ...).

Adding an expert later: the clustering has ``coarse`` clusters and the recipe trains the first ``experts``
of them (default all). Re-running with ``experts`` one larger runs only ``expert_<new>`` (plus its own
``dense_<S>`` baseline, when ``dense``) and a new ``ensemble_<n+1>``; the finished experts are skipped.

Arguments (``--config configs/mode.py:ARGS``): for get_config as configs/clip.py (size=, text_size=,
steps=, batch=, synthetic, image_size=) and schedule=T (stop at steps= of a T-step schedule); for get_recipe:
  fine=110 coarse=2    fine and coarse cluster counts (the fine count must divide the 7370 captions:
                       balanced clusters have exactly N/fine points; MoDE uses 1024 fine at scale)
  balanced_coarse=1    balanced coarse level (coarse must divide fine); 0: plain k-means of the fine centres
  experts=0            how many coarse clusters get an expert (0 = all)
  seed_steps=292 expert_steps=54 batch=128   the schedule (warm-up min(40, schedule / 10) as configs/clip.py)
  resume=1             experts resume the seed's optimizer and schedule; 0: parameters only (see above)
  dense=True           also train the dense baseline
  encoder=minilm       or seed (see above)
  ooc=0.02 iters=10    out-of-cluster fraction; k-means iterations
  seed=S               seed of every train stage, the clustering and the out-of-cluster draw (default:
                       the configs' own seed and 0)

Expected result (2026-12-06, seed 0, the recipe at these defaults with the dense baseline the methods table's
clip run of 400 steps; BENCHMARKS 'MoDE: data experts against a dense run'): expert subsets of 3,784 and 3,733
records; easy-VQA / emoji category top-1, held-out t2i / i2t R@10:
  seed (292 of 346 steps)          0.880  0.174  0.192  0.156
  expert_0                         0.824  0.164  0.201  0.147
  expert_1                         0.902  0.181  0.183  0.147
  best expert                      0.902  0.181  0.201  0.147
  uniform average                  0.884  0.172  0.197  0.152
  MoDE ensemble (temperature 8)    0.895  0.172  0.197  0.152
  MoDE ensemble (temperature 1)    0.902  0.168  0.197  0.147
  dense CLIP, 400 steps            0.946  0.185  0.218  0.156
The experts resume a seed that is already good and move little in 54 steps; the ensemble is above the uniform
average and, at temperature 1, equal to the best expert on easy-VQA; dense CLIP is ahead at equal compute.
Commands (the dense row and temperature 1 from the ensemble command with --baseline and --temperature 1):
  python -m clus_jax.recipe --config configs/mode.py --workdir /tmp/clus_jax/mode
  python -m clus_jax.ensemble --experts /tmp/clus_jax/mode/expert_0 /tmp/clus_jax/mode/expert_1 \\
      --clusters /tmp/clus_jax/mode/clusters --captions /tmp/clus_jax/mode/captions \\
      --baseline /tmp/clus_jax/mode/dense_400 --out /tmp/clus_jax/mode/ensemble_t1 --temperature 1
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from clus_jax.clustering.expert_subsets import subset_file
from clus_jax.config import base as common
from clus_jax.recipe import Stage

THIS_CONFIG = __file__


def get_config(arg: str | None = None):
    """The CLIP run of one stage: config.base's towers, data and optimizer (as configs/clip.py, at batch 128).
    ``schedule=T`` (with ``steps=S``, S <= T): stop at step S of a T-step schedule (warm-up and checkpoint
    cadence from T), as the seed does so that its experts can resume the schedule's tail."""
    a = common.parse_arg(arg, size="", text_size="", steps=0, batch=0, synthetic=False, image_size=0, schedule=0)
    config = common.base_config()
    config.objectives = {"clip": 1.0}
    stop = a.steps
    if a.schedule:
        if not 0 < stop <= a.schedule:
            raise ValueError(f"config argument schedule={a.schedule} needs steps= in [1, {a.schedule}], got {stop}")
        a.steps = a.schedule
    common.apply_args(config, a)
    if a.schedule:
        config.total_steps, config.optim.schedule_steps = stop, a.schedule
    return config


def mode_stages(*, fine: int = 110, coarse: int = 2, experts: int = 0, seed_steps: int = 292,
                expert_steps: int = 54, batch: int = 128, dense: bool = True, encoder: str = "minilm",
                ooc_ratio: float = 0.02, iters: int = 10, seed: int = 0, resume: bool = True,
                balanced_coarse: bool = True, train_overrides: Mapping[str, Any] | None = None,
                data_args: Sequence[str] = (), eval_args: Sequence[str] = (),
                config_path: str | None = None) -> list[Stage]:
    """MoDE's stages. ``train_overrides`` go to every train stage (``--config.KEY=VALUE``), ``data_args``
    (``--data.KEY=VALUE``) to the caption embedding, ``eval_args`` to the ensemble evaluation; they must
    describe the same data. ``experts`` 0 trains every coarse cluster's expert. ``resume``: the seed stops at
    ``seed_steps`` of a ``seed_steps + expert_steps`` schedule and each expert resumes it (parameters,
    optimizer state, step: ``init_from.mode='resume'``) for the last ``expert_steps``; else each expert loads
    the seed's parameters alone and runs ``expert_steps`` on a fresh optimizer and schedule.
    ``balanced_coarse``: balanced k-means of the fine centres (``coarse`` must divide ``fine``)."""
    if encoder not in ("minilm", "seed"):
        raise ValueError(f"encoder={encoder!r}: expected minilm or seed")
    experts = experts or coarse
    if not 1 <= experts <= coarse:
        raise ValueError(f"experts={experts} must lie in [1, coarse={coarse}]")
    if balanced_coarse and fine % coarse:
        raise ValueError(f"balanced_coarse needs coarse={coarse} to divide fine={fine} "
                         "(balanced_coarse=0: plain k-means)")
    spec = config_path or THIS_CONFIG
    overrides = dict(train_overrides or {})

    def train(steps: int, schedule: int = 0) -> str:
        return f"{spec}:steps={steps},batch={batch}" + (f",schedule={schedule}" if schedule else "")

    schedule = seed_steps + expert_steps
    seed_stage = Stage("seed", train=train(seed_steps, schedule if resume else 0), overrides=overrides)
    if encoder == "minilm":
        embed = ["--encoder", "minilm"]
    else:
        embed = ["--workdir", "{seed}", "--modality", "text"]
    stages = [] if encoder == "minilm" else [seed_stage]
    stages += [
        Stage("captions", module="clus_jax.embed", args=[*embed, "--out", "{workdir}", *data_args]),
        Stage("clusters", module="clus_jax.cluster",
              args=["--features", "{captions}", "--field", "text_emb", "--levels", f"{fine},{coarse}", "--balanced",
                    *(["--balanced-coarse"] if balanced_coarse else []),
                    "--metric", "euclidean", "--iters", str(iters), "--seed", str(seed), "--out", "{workdir}"]),
        Stage("subsets", module="clus_jax.experts",
              outputs={f"expert_{c}": subset_file(c) for c in range(coarse)},
              args=["--features", "{captions}", "--clusters", "{clusters}", "--out", "{workdir}",
                    "--ooc-ratio", str(ooc_ratio), "--seed", str(seed)]),
    ]
    if encoder == "minilm":
        stages.append(seed_stage)
    names = []
    # resumed: a checkpoint within the expert's own steps, so that an interrupted expert resumes from it
    cadence = {"checkpoint_every": max(expert_steps // 2, 1)} if resume else {}
    start = {"init_from.path": "{seed}", **({"init_from.mode": "resume"} if resume else {})}
    for c in range(experts):
        names.append(f"expert_{c}")
        stages.append(Stage(names[-1], train=train(schedule if resume else expert_steps),
                            overrides={**cadence, **overrides, **start, "data.subset": f"{{subsets.expert_{c}}}"}))
    ensemble = ["--experts", *(f"{{{n}}}" for n in names), "--clusters", "{clusters}", "--captions", "{captions}"]
    if dense:
        total = seed_steps + experts * expert_steps
        stages.append(Stage(f"dense_{total}", train=train(total), overrides=overrides))
        ensemble += ["--baseline", f"{{dense_{total}}}"]
    stages.append(Stage(f"ensemble_{experts}", module="clus_jax.ensemble",
                        args=[*ensemble, "--out", "{workdir}", *eval_args]))
    return stages


def get_recipe(arg: str | None = None) -> list[Stage]:
    a = common.parse_arg(arg, fine=110, coarse=2, experts=0, seed_steps=292, expert_steps=54, batch=128,
                         dense=True, encoder="minilm", ooc=0.02, iters=10, seed=-1, resume=True,
                         balanced_coarse=True)
    seeded = {"seed": a.seed} if a.seed >= 0 else {}
    return mode_stages(fine=a.fine, coarse=a.coarse, experts=a.experts, seed_steps=a.seed_steps,
                       expert_steps=a.expert_steps, batch=a.batch, dense=a.dense, encoder=a.encoder,
                       ooc_ratio=a.ooc, iters=a.iters, seed=max(a.seed, 0), resume=a.resume,
                       balanced_coarse=a.balanced_coarse, train_overrides=seeded)
