"""Embedding shards written by ``python -m clus_jax.embed``, read one shard at a time for k-means.

The directory is a side file (``clus_jax/data/side_fields.py`` reads it). Rows whose ``valid`` entry is
False (records that could not be embedded) are skipped; ``record_indices()`` gives the record index of every
row that is yielded, in order, so cluster labels can be written back keyed by record index.
"""
from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np

from clus_jax.data.side_fields import INDEX_FIELD, VALID_FIELD, SideFieldReader, field_specs


class EmbeddingShards:
    """Re-iterable over the valid rows of one embedding field, one float32 [n_i, D] array per shard.

    ``field`` is the embedding to read (``"image_emb"``, ``"text_emb"``); None picks the only field that
    is neither ``index`` nor ``valid``.
    """

    def __init__(self, directory: str | os.PathLike, field: str | None = None):
        self.directory = os.fspath(directory)
        fields = list(field_specs(self.directory))
        if field is None:
            candidates = [f for f in fields if f not in (INDEX_FIELD, VALID_FIELD)]
            if len(candidates) != 1:
                raise ValueError(f"embedding directory {self.directory!r} has fields {sorted(fields)}; name the one "
                                 f"to cluster (field=...)")
            field = candidates[0]
        if field not in fields:
            raise ValueError(f"embedding directory {self.directory!r} has no field {field!r} (fields: {sorted(fields)})")
        self.field = field
        self._rows = SideFieldReader(self.directory, field=field)
        if len(self._rows.spec.shape) != 1:
            raise ValueError(f"field {field!r} of {self.directory!r} has per-record shape {self._rows.spec.shape}; "
                             f"k-means needs vectors")
        self._valid = SideFieldReader(self.directory, field=VALID_FIELD) if VALID_FIELD in fields else None
        self._index = SideFieldReader(self.directory, field=INDEX_FIELD) if INDEX_FIELD in fields else None
        for reader in (self._rows, self._index):  # a shard cut short fails here, not in the middle of a pass
            if reader is not None:
                reader.check_files()
        self._num_rows = sum(int(m.sum()) for m in self._valid.chunks()) if self._valid else len(self._rows)

    @property
    def dim(self) -> int:
        return int(self._rows.spec.shape[0])

    @property
    def num_rows(self) -> int:
        """Number of valid rows (what one pass yields)."""
        return self._num_rows

    @property
    def num_records(self) -> int:
        """Number of records the directory has a row for, embedded or not (the side file's length)."""
        return len(self._rows)

    def __len__(self) -> int:
        return self._num_rows

    def __iter__(self) -> Iterator[np.ndarray]:
        masks = self._valid.chunks() if self._valid else None
        for rows in self._rows.chunks():
            rows = np.asarray(rows, np.float32)
            if masks is not None:
                rows = rows[np.asarray(next(masks), bool)]
            if len(rows):
                yield rows

    def record_indices(self) -> np.ndarray:
        """int64 [num_rows]: the record index of each yielded row."""
        if self._index is not None:
            index = self._index.array().astype(np.int64)
        else:
            index = np.arange(len(self._rows), dtype=np.int64)
        if self._valid is not None:
            index = index[self._valid.array().astype(bool)]
        return index

    def __repr__(self) -> str:
        return f"EmbeddingShards({self.directory!r}, field={self.field!r}, rows={self._num_rows}, dim={self.dim})"

