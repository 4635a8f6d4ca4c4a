"""MoDE's expert data on disk (``python -m clus_jax.experts --out DIR``): one subset index per coarse cluster.

Each embedded record's fine centre is its *nearest* fine centre (``mode_ensemble.fine_assignment``), not the
balanced assignment k-means trained with; expert c's data is every record whose fine centre maps to c plus a
seeded random share of the other records (``mode_ensemble.expert_membership``)::

    expert_<c>.npy      int64 [n_c] sorted record indices of expert c (``--config.data.subset`` reads it)
    fine_ids.npy        int32 [num_records] nearest fine centre of each record, -1 where it has no embedding
    experts.json        the arguments, and per expert its size and how many records are out of cluster
"""
from __future__ import annotations

import os
from typing import Any

import numpy as np
from etils import epath

from clus_jax.clustering import mode_ensemble
from clus_jax.clustering.outputs import by_record
from clus_jax.clustering.shards import EmbeddingShards
from clus_jax.common.files import atomic_save_npy

SUMMARY_FILE = "experts.json"
FINE_IDS_FILE = "fine_ids.npy"


def subset_file(expert: int) -> str:
    """The file name of expert ``expert``'s record indices."""
    return f"expert_{expert}.npy"


def nearest_fine_ids(shards: EmbeddingShards, fine_centers: np.ndarray, metric: str) -> np.ndarray:
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


def write_expert_subsets(out: str | os.PathLike, shards: EmbeddingShards, fine_centers: np.ndarray,
                         fine_to_coarse: np.ndarray, num_experts: int, metric: str, ooc_ratio: float,
                         seed: int) -> list[dict[str, Any]]:
    """Writes every expert's subset and ``fine_ids.npy`` into ``out``; returns per expert its file, size and how
    many of its records are in and out of its cluster (for ``experts.json``)."""
    records = shards.record_indices()
    fine_ids = nearest_fine_ids(shards, fine_centers, metric)
    subsets = expert_subsets(records, fine_ids, fine_to_coarse, num_experts, ooc_ratio, seed)
    out = epath.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_save_npy(out / FINE_IDS_FILE, by_record(fine_ids, records, shards.num_records))
    coarse_of_record = by_record(fine_to_coarse[fine_ids].astype(np.int64), records, shards.num_records)
    experts = []
    for c, subset in enumerate(subsets):
        atomic_save_npy(out / subset_file(c), subset)
        inside = int((coarse_of_record[subset] == c).sum())
        experts.append({"expert": c, "file": subset_file(c), "records": len(subset), "in_cluster": inside,
                        "out_of_cluster": len(subset) - inside})
    return experts
