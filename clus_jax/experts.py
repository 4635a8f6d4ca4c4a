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

Output, ``DIR/``::

    expert_<c>.npy      int64 [n_c] sorted record indices of expert c (``--config.data.subset`` reads it)
    fine_ids.npy        int32 [num_records] nearest fine centre of each record, -1 where it has no embedding
    experts.json        the arguments, and per expert its size and how many records are out of cluster

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
from clus_jax.clustering import mode_ensemble

SPEC_FILE = "experts.json"
FINE_IDS_FILE = "fine_ids.npy"


def subset_file(expert: int) -> str:
    """The file name of expert ``expert``'s record indices."""
    return f"expert_{expert}.npy"


class _ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not argparse's usage block
        cli.fail(message)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = _ArgumentParser(prog="python -m clus_jax.experts", allow_abbrev=False,
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


def load_hierarchy(clusters: str) -> tuple[np.ndarray, np.ndarray, int, str]:
    """(fine centres [m, D], fine_to_coarse [m], number of coarse clusters, metric) of a cluster output."""
    files = {name: os.path.join(clusters, f"{name}.npy") for name in ("centers", "fine_to_coarse", "coarse_centers")}
    missing = [os.path.basename(f) for f in files.values() if not os.path.isfile(f)]
    if missing:
        raise FileNotFoundError(f"--clusters {clusters} has no {', '.join(missing)} (run python -m clus_jax.cluster "
                                f"with --levels M,N)")
    summary_path = os.path.join(clusters, "summary.json")
    metric = "euclidean"
    if os.path.isfile(summary_path):
        with open(summary_path, encoding="utf-8") as f:
            metric = json.load(f).get("metric", metric)
    return (np.load(files["centers"]), np.load(files["fine_to_coarse"]), len(np.load(files["coarse_centers"])),
            metric)


def nearest_fine_ids(shards: Any, fine_centers: np.ndarray, metric: str) -> np.ndarray:
    """int32 [valid rows]: each embedded record's nearest fine centre, shard by shard."""
    ids = [mode_ensemble.fine_assignment(rows, fine_centers, metric) for rows in shards]
    return np.concatenate(ids).astype(np.int32) if ids else np.zeros(0, np.int32)


def expert_subsets(record_indices: np.ndarray, fine_ids: np.ndarray, fine_to_coarse: np.ndarray, num_experts: int,
                   ooc_ratio: float = mode_ensemble.DEFAULT_OOC_RATIO, seed: int = 0) -> list[np.ndarray]:
    """Per expert, the sorted record indices (int64) it trains on: ``expert_membership`` over the embedded
    rows, mapped to record indices (records without an embedding belong to no expert)."""
    members = mode_ensemble.expert_membership(fine_ids, fine_to_coarse, num_experts, ooc_ratio, seed)
    record_indices = np.asarray(record_indices, np.int64)
    return [np.sort(record_indices[m]) for m in members]


def _save(path: str, array: np.ndarray) -> None:
    tmp = f"{path}.tmp-{os.getpid()}.npy"
    np.save(tmp, array)
    os.replace(tmp, path)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Writes every expert's subset into ``args.out``; returns the summary written to ``experts.json``."""
    from clus_jax.clustering import EmbeddingShards
    from clus_jax.data.side_fields import SideFieldReader

    try:
        fine_centers, fine_to_coarse, num_experts, cluster_metric = load_hierarchy(args.clusters)
        shards = EmbeddingShards(args.features, field=args.field)
        num_records = len(SideFieldReader(args.features, field=shards.field))
    except (FileNotFoundError, ValueError) as e:
        raise cli.UsageError(cli.exception_text(e)) from None
    if shards.dim != fine_centers.shape[1]:
        raise cli.UsageError(f"--features {args.features} field {shards.field} is {shards.dim} wide but the fine "
                             f"centres of --clusters {args.clusters} are {fine_centers.shape[1]} wide")
    metric = args.metric or cluster_metric
    records = shards.record_indices()
    fine_ids = nearest_fine_ids(shards, fine_centers, metric)
    subsets = expert_subsets(records, fine_ids, fine_to_coarse, num_experts, args.ooc_ratio, args.seed)
    os.makedirs(args.out, exist_ok=True)
    by_record = np.full((num_records,), -1, np.int32)
    by_record[records] = fine_ids
    _save(os.path.join(args.out, FINE_IDS_FILE), by_record)
    coarse_of_record = np.full((num_records,), -1, np.int64)
    coarse_of_record[records] = fine_to_coarse[fine_ids]
    experts = []
    for c, subset in enumerate(subsets):
        _save(os.path.join(args.out, subset_file(c)), subset)
        inside = int((coarse_of_record[subset] == c).sum())
        experts.append({"expert": c, "file": subset_file(c), "records": len(subset), "in_cluster": inside,
                        "out_of_cluster": len(subset) - inside})
    summary = {"features": args.features, "field": shards.field, "clusters": args.clusters, "metric": metric,
               "ooc_ratio": args.ooc_ratio, "seed": args.seed, "num_records": num_records,
               "embedded_records": len(records), "fine": len(fine_centers), "num_experts": num_experts,
               "experts": experts}
    tmp = os.path.join(args.out, f".{SPEC_FILE}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=1)
    os.replace(tmp, os.path.join(args.out, SPEC_FILE))
    return summary


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        summary = run(args)
    except cli.UsageError as e:
        cli.fail(str(e), code=1)
    sizes = ", ".join(f"{e['expert']}: {e['records']} ({e['out_of_cluster']} out of cluster)"
                      for e in summary["experts"])
    print(f"experts: {summary['num_experts']} subsets of {summary['embedded_records']} records: {sizes}",
          file=sys.stderr, flush=True)
    print(json.dumps({k: v for k, v in summary.items() if k != "experts"} | {"sizes": [e["records"] for e in
                                                                                     summary["experts"]]}), flush=True)


if __name__ == "__main__":
    main()
