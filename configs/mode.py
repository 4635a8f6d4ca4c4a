"""MoDE (Ma et al., CVPR 2024): CLIP data experts from a two-level clustering of the captions, trained from a
shared seed run and ensembled by task metadata. ``get_recipe`` is the whole method; ``get_config`` is the
CLIP run of any one stage (configs/clip.py's towers, data and optimizer).

Command (CPU, the recipe: embed captions -> cluster -> expert subsets -> seed -> experts -> dense baseline ->
ensemble evaluation; measured 39.5 minutes wall, 8.1 minutes of CPU, on 2 cores shared with a load of ~20):
  python -m clus_jax.recipe --config configs/mode.py --workdir /tmp/clus_jax/mode
One stage alone, e.g. an expert continuing from a finished seed run:
  python -m clus_jax.train --config configs/mode.py:steps=125 --workdir /tmp/clus_jax/mode/expert_0 \\
      --config.init_from.path=/tmp/clus_jax/mode/seed --config.data.subset=/tmp/clus_jax/mode/subsets/expert_0.npy

Stages (each in WORKDIR/<name>, skipped when done):
  captions     python -m clus_jax.embed --encoder minilm: all-MiniLM-L6-v2 embeddings of every caption
  clusters     python -m clus_jax.cluster --levels fine,coarse --balanced (euclidean on unit features)
  subsets      python -m clus_jax.experts: per coarse cluster the records whose *nearest* fine centre maps to
               it, plus 2% out-of-cluster records (seeded); written for every coarse cluster
  seed         CLIP on all data for seed_steps
  expert_<c>   CLIP for expert_steps from the seed's parameters (init_from) on subset c; independent runs
               (python -m clus_jax.recipe ... --launcher tpu_pod prints one launcher command per stage)
  dense_<S>    one CLIP run of S = seed_steps + experts x expert_steps steps: the same total compute
  ensemble_<n> python -m clus_jax.ensemble: each expert, the best, the uniform average, the
               metadata ensemble and the dense baseline, in WORKDIR/ensemble_<n>/ensemble.md

Caption encoder: MiniLM (``encoder=minilm``, the default), MoDE's SimCSE stand-in. MoDE chose a sentence
encoder because it clustered better than CLIP's own text embeddings (paper Sec. 5.3), and it does not depend
on the seed: the clustering runs before any training and the experts' data is fixed whatever the seed
learns. ``encoder=seed`` embeds the captions with the seed run's text tower instead (the stages then run
seed -> captions -> ...).

Adding an expert later: the clustering has ``coarse`` clusters and the recipe trains the first ``experts``
of them (default all). Re-running with ``experts`` one larger runs only ``expert_<new>`` (plus its own
``dense_<S>`` baseline, when ``dense``) and a new ``ensemble_<n+1>``; the finished experts are skipped.

Arguments (``--config configs/mode.py:ARGS``): for get_config as configs/clip.py (size=, text_size=,
steps=, batch=, synthetic, image_size=); for get_recipe:
  fine=110 coarse=2    fine and coarse cluster counts (the fine count must divide the 7370 captions:
                       balanced clusters have exactly N/fine points; MoDE uses 1024 fine at scale)
  experts=0            how many coarse clusters get an expert (0 = all)
  seed_steps=150 expert_steps=125 batch=128   the schedule (warmup steps/10 as configs/clip.py)
  dense=True           also train the dense baseline
  encoder=minilm       or seed (see above)
  ooc=0.02 iters=10    out-of-cluster fraction; k-means iterations
  seed=S               seed of every train stage, the clustering and the out-of-cluster draw (default:
                       the configs' own seed and 0)

At equal compute on the current towers (bench/methods.py: seed_steps=150,expert_steps=125,dense=0,seed=S for
seeds 0-2, against configs/clip.py at 400 steps of batch 128), the MoDE ensemble reaches easy-VQA 0.771 +- 0.068,
emoji category 0.168 +- 0.054, held-out i2t R@10 0.136 +- 0.029 and t2i R@10 0.160 +- 0.072, against CLIP's
0.821, 0.165, 0.147 and 0.179 (BENCHMARKS 'Methods at equal compute'); the recipe took 9-10 minutes per seed on
shared cores (captions 36 s, clusters 107 s at seed 0).

Expected result (measured with the earlier default towers: model.image.patch_size=8, conv_stem=(),
config.param_groups=[]; 2026-12-01, defaults: fine=110, coarse=2, seed 150 + 2 x 125 steps against a dense
400-step run, batch 128; stage times captions 191 s, clusters 875 s, subsets 8 s, seed 281 s, experts
192 s and 183 s, dense 553 s, ensemble 79 s; the temperature-1 row is ``python -m clus_jax.ensemble``
of the same runs with ``--temperature 1``):

  | row | easy-VQA top-1 | emoji category top-1 | heldout t2i R@10 | heldout i2t R@10 | OpenMoji t2i R@10 | OpenMoji i2t R@10 |
  |---|---|---|---|---|---|---|
  | seed (150 steps, all data) | 0.045 | 0.115 | 0.079 | 0.085 | 0.011 | 0.011 |
  | expert_0 (3162 emoji captions) | 0.080 | **0.181** | **0.170** | **0.175** | 0.021 | 0.015 |
  | expert_1 (4354: easy-VQA shapes, a few emoji) | **0.305** | 0.071 | 0.100 | 0.104 | 0.003 | 0.008 |
  | best expert (per metric) | 0.305 | 0.181 | 0.170 | 0.175 | 0.021 | 0.015 |
  | uniform average | 0.298 | 0.183 | 0.170 | 0.175 | 0.023 | 0.013 |
  | MoDE ensemble (MetaCLIP's temperature 8) | 0.294 | 0.180 | 0.170 | 0.175 | 0.023 | 0.013 |
  | MoDE ensemble, temperature 1 (`--temperature 1`) | 0.305 | 0.1805 | 0.175 | 0.166 | 0.021 | 0.013 |
  | dense CLIP, 400 steps (same compute) | **0.420** | **0.220** | 0.157 | 0.142 | 0.027 | 0.018 |

  With MetaCLIP's rule the ensemble stays below the best expert on easy-VQA (0.294 vs 0.305): under 210 classes
  its weights are soft (easy-VQA 0.17 / 0.83, emoji category 0.53 / 0.47), close to the uniform average. At
  temperature 1 (0.000003 / 0.999997 and 0.73 / 0.27) it equals the best expert on easy-VQA and is one image in
  2000 below it on emoji category. The dense run wins on zero-shot and loses on held-out retrieval: the
  150-step seed is near chance, so the experts are almost trained from scratch (README, MoDE).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from clus_jax.clustering.expert_subsets import subset_file
from clus_jax.config import base as common
from clus_jax.recipe import Stage

THIS_CONFIG = __file__


def get_config(arg: str | None = None):
    """The CLIP run of one stage: config.base's towers, data and optimizer (as configs/clip.py, at batch 128)."""
    a = common.parse_arg(arg, size="", text_size="", steps=0, batch=0, synthetic=False, image_size=0)
    config = common.base_config()
    config.objectives = {"clip": 1.0}
    common.apply_args(config, a)
    return config


def mode_stages(*, fine: int = 110, coarse: int = 2, experts: int = 0, seed_steps: int = 150,
                expert_steps: int = 125, batch: int = 128, dense: bool = True, encoder: str = "minilm",
                ooc_ratio: float = 0.02, iters: int = 10, seed: int = 0,
                train_overrides: Mapping[str, Any] | None = None, data_args: Sequence[str] = (),
                eval_args: Sequence[str] = (), config_path: str | None = None) -> list[Stage]:
    """MoDE's stages. ``train_overrides`` go to every train stage (``--config.KEY=VALUE``), ``data_args``
    (``--data.KEY=VALUE``) to the caption embedding, ``eval_args`` to the ensemble evaluation; they must
    describe the same data. ``experts`` 0 trains every coarse cluster's expert."""
    if encoder not in ("minilm", "seed"):
        raise ValueError(f"encoder={encoder!r}: expected minilm or seed")
    experts = experts or coarse
    if not 1 <= experts <= coarse:
        raise ValueError(f"experts={experts} must lie in [1, coarse={coarse}]")
    spec = config_path or THIS_CONFIG
    overrides = dict(train_overrides or {})

    def train(steps: int) -> str:
        return f"{spec}:steps={steps},batch={batch}"

    seed_stage = Stage("seed", train=train(seed_steps), overrides=overrides)
    if encoder == "minilm":
        embed = ["--encoder", "minilm"]
    else:
        embed = ["--workdir", "{seed}", "--modality", "text"]
    stages = [] if encoder == "minilm" else [seed_stage]
    stages += [
        Stage("captions", module="clus_jax.embed", args=[*embed, "--out", "{workdir}", *data_args]),
        Stage("clusters", module="clus_jax.cluster",
              args=["--features", "{captions}", "--field", "text_emb", "--levels", f"{fine},{coarse}", "--balanced",
                    "--metric", "euclidean", "--iters", str(iters), "--seed", str(seed), "--out", "{workdir}"]),
        Stage("subsets", module="clus_jax.experts",
              outputs={f"expert_{c}": subset_file(c) for c in range(coarse)},
              args=["--features", "{captions}", "--clusters", "{clusters}", "--out", "{workdir}",
                    "--ooc-ratio", str(ooc_ratio), "--seed", str(seed)]),
    ]
    if encoder == "minilm":
        stages.append(seed_stage)
    names = []
    for c in range(experts):
        names.append(f"expert_{c}")
        stages.append(Stage(names[-1], train=train(expert_steps),
                            overrides={**overrides, "init_from.path": "{seed}",
                                       "data.subset": f"{{subsets.expert_{c}}}"}))
    ensemble = ["--experts", *(f"{{{n}}}" for n in names), "--clusters", "{clusters}", "--captions", "{captions}"]
    if dense:
        total = seed_steps + experts * expert_steps
        stages.append(Stage(f"dense_{total}", train=train(total), overrides=overrides))
        ensemble += ["--baseline", f"{{dense_{total}}}"]
    stages.append(Stage(f"ensemble_{experts}", module="clus_jax.ensemble",
                        args=[*ensemble, "--out", "{workdir}", *eval_args]))
    return stages


def get_recipe(arg: str | None = None) -> list[Stage]:
    a = common.parse_arg(arg, fine=110, coarse=2, experts=0, seed_steps=150, expert_steps=125, batch=128,
                         dense=True, encoder="minilm", ooc=0.02, iters=10, seed=-1)
    seeded = {"seed": a.seed} if a.seed >= 0 else {}
    return mode_stages(fine=a.fine, coarse=a.coarse, experts=a.experts, seed_steps=a.seed_steps,
                       expert_steps=a.expert_steps, batch=a.batch, dense=a.dense, encoder=a.encoder,
                       ooc_ratio=a.ooc, iters=a.iters, seed=max(a.seed, 0), train_overrides=seeded)
