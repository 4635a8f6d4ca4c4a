"""Every record's ``l`` nearest centres as a side file keyed by record index (``python -m clus_jax.cluster --topk L
--assign-to DIR``), what a training run joins as the ``cluster_labels`` batch field (MLCD).

Fields: ``cluster_labels`` int32 [l], nearest first; ``cluster_sims`` float32 [l] (the dot product with unit
centres for cosine, minus the squared distance for euclidean); ``index`` int64. A record that has no embedding
gets labels -1 and similarities 0.
"""
from __future__ import annotations

import os
from typing import Any

import numpy as np

from clus_jax.clustering.assign import assign_topk
from clus_jax.clustering.shards import EmbeddingShards
from clus_jax.data.fields import FieldSpec
from clus_jax.data.side_fields import INDEX_FIELD, SideFileWriter

LABELS_FIELD = "cluster_labels"
SIMS_FIELD = "cluster_sims"


def write_topk_side_file(shards: EmbeddingShards, centers: np.ndarray, l: int, metric: str, path: str | os.PathLike,
                         num_records: int, *, mesh: Any = None, write: bool = True) -> dict[str, Any]:
    """The ``l`` nearest centres of every record into the side file ``path``, one shard of points at a time.

    ``write=False`` (a process other than the one that writes) only runs the assignment, which is collective
    on a multi-process mesh. Returns a small summary. Raises ValueError when the shards' record indices do not
    increase (the labels could not be keyed by record index)."""
    specs = {LABELS_FIELD: FieldSpec((l,), "int32"), SIMS_FIELD: FieldSpec((l,), "float32"),
             INDEX_FIELD: FieldSpec((), "int64")}
    records = shards.record_indices()
    writer = SideFileWriter(path, specs, overwrite=True) if write else None
    position, row, labelled = 0, 0, 0
    for chunk in shards:
        ids, sims = assign_topk(chunk, centers, l, metric, mesh=mesh)
        index = records[row:row + len(chunk)]
        row += len(chunk)
        labelled += len(chunk)
        if writer is None:
            continue
        if len(index) and (index[0] < position or np.any(np.diff(index) <= 0)):
            raise ValueError(f"{shards.directory}: record indices are not increasing; cannot key labels by record "
                             f"index")
        end = int(index[-1]) + 1
        labels = np.full((end - position, l), -1, np.int32)
        scores = np.zeros((end - position, l), np.float32)
        labels[index - position], scores[index - position] = ids, sims
        writer.write({LABELS_FIELD: labels, SIMS_FIELD: scores, INDEX_FIELD: np.arange(position, end, dtype=np.int64)})
        position = end
    if writer is not None:
        if num_records > position:  # the records after the last embedded one
            n = num_records - position
            writer.write({LABELS_FIELD: np.full((n, l), -1, np.int32), SIMS_FIELD: np.zeros((n, l), np.float32),
                          INDEX_FIELD: np.arange(position, num_records, dtype=np.int64)})
        writer.close()
    return {"l": l, "side_file": os.fspath(path), "records": max(position, num_records), "labelled": labelled}
