"""python -m clus_jax.experts: MoDE's expert data, one subset index per coarse cluster.

    python -m clus_jax.experts --features EMB --clusters CLUSTERS --out DIR [--field text_emb]
        [--ooc-ratio 0.02] [--seed 0] [--metric euclidean|cosine]

``EMB`` is a caption embedding directory (``python -m clus_jax.embed``), ``CLUSTERS`` the output of
``python -m clus_jax.cluster --levels M,N`` on it (``centers.npy`` the M fine centres, ``fine_to_coarse.npy``
and ``coarse_centers.npy``). Each record's fine centre is its *nearest* fine centre
(``mode_ensemble.fine_assignment``: greedy, on the L2-normalised feature, as MetaCLIP's
``prep_inference``), not the balanced assignment k-means trained with, which only served to estimate
the centres. Expert c's data is every record whose fine centre maps to c plus a seeded random
``--ooc-ratio`` of the other records (``mode_ensemble.expert_membership``; MoDE's 0.02 by default).

Output, ``DIR/`` (``clustering/expert_subsets.py``): ``expert_<c>.npy`` (int64 sorted record indices of
expert c, what ``--config.data.subset`` reads), ``fine_ids.npy`` (int32 nearest fine centre of each record,
-1 where it has no embedding) and ``experts.json`` (the arguments, and per expert its size and how many
records are out of cluster).

The metric defaults to the clustering's (``CLUSTERS/summary.json``). Every expert's subset is written,
whichever experts are trained: an expert trained later reads the same file. A mistyped command exits with
one ``error: ...`` line (code 2), unusable inputs with one such line and code 1.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

from clus_jax.common import cli
from clus_jax.common.files import atomic_write_json
from clus_jax.clustering import mode_ensemble


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = cli.ArgumentParser(prog="python -m clus_jax.experts", allow_abbrev=False,
                           description="Writes MoDE's per-expert subset indices from a two-level clustering.")
    p.add_argument("--features", required=True, help="the embedding directory that was clustered")
    p.add_argument("--clusters", required=True, help="python -m clus_jax.cluster --levels M,N output")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--field", default="text_emb", help="embedding field (default text_emb)")
    p.add_argument("--ooc-ratio", type=float, default=mode_ensemble.DEFAULT_OOC_RATIO,
                   help="fraction of out-of-cluster records each expert also gets (default 0.02)")
    p.add_argument("--seed", type=int, default=0, help="seed of the out-of-cluster draws")
    p.add_argument("--metric", choices=mode_ensemble.METRICS, default=None,
                   help="nearest fine centre by this metric (default: the clustering's)")
    args = p.parse_args(argv)
    if not 0.0 <= args.ooc_ratio <= 1.0:
        cli.fail(f"--ooc-ratio={args.ooc_ratio} must lie in [0, 1]")
    return args


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Writes every expert's subset into ``args.out``; returns the summary written to ``experts.json`` (last, so
    a run that stopped leaves no summary; a re-run writes every file again)."""
    from clus_jax.clustering import EmbeddingShards, expert_subsets
    from clus_jax.clustering.outputs import load_hierarchy

    cli.check_out_dir("--out", args.out)
    try:
        fine_centers, fine_to_coarse, num_experts, cluster_metric = load_hierarchy(args.clusters)
    except (FileNotFoundError, ValueError) as e:
        raise cli.InputError(f"--clusters {cli.exception_text(e)}") from None
    in_range = np.all((fine_to_coarse >= 0) & (fine_to_coarse < num_experts))
    if fine_to_coarse.shape != (len(fine_centers),) or not in_range:
        raise cli.InputError(f"--clusters {args.clusters}: fine_to_coarse.npy {fine_to_coarse.dtype}"
                             f"{list(fine_to_coarse.shape)} does not map its {len(fine_centers)} fine centres to "
                             f"its {num_experts} coarse ones")
    try:
        shards = EmbeddingShards(args.features, field=args.field)
    except (FileNotFoundError, ValueError) as e:
        raise cli.InputError(f"--features {args.features}: {cli.exception_text(e)}") from None
    if shards.dim != fine_centers.shape[1]:
        raise cli.InputError(f"--features {args.features} field {shards.field} is {shards.dim} wide but the fine "
                             f"centres of --clusters {args.clusters} are {fine_centers.shape[1]} wide")
    metric = args.metric or cluster_metric
    experts = expert_subsets.write_expert_subsets(args.out, shards, fine_centers, fine_to_coarse, num_experts, metric,
                                                  args.ooc_ratio, args.seed)
    summary = {"features": args.features, "field": shards.field, "clusters": args.clusters, "metric": metric,
               "ooc_ratio": args.ooc_ratio, "seed": args.seed, "num_records": shards.num_records,
               "embedded_records": shards.num_rows, "fine": len(fine_centers), "num_experts": num_experts,
               "experts": experts}
    atomic_write_json(os.path.join(args.out, expert_subsets.SUMMARY_FILE), summary)
    return summary


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    summary = cli.run_command(lambda: run(args))
    sizes = ", ".join(f"{e['expert']}: {e['records']} ({e['out_of_cluster']} out of cluster)"
                      for e in summary["experts"])
    print(f"experts: {summary['num_experts']} subsets of {summary['embedded_records']} records: {sizes}",
          file=sys.stderr, flush=True)
    print(json.dumps({k: v for k, v in summary.items() if k != "experts"} | {"sizes": [e["records"] for e in
                                                                                     summary["experts"]]}), flush=True)


if __name__ == "__main__":
    main()
