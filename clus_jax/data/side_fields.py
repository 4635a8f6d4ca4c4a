"""Side files: per-record arrays stored next to a dataset, keyed by record index, read by random access.

A side file adds batch fields that the records themselves do not hold (cluster labels, embeddings,
sample weights) without rewriting the dataset. Row ``i`` of a side file belongs to record ``i`` of the
*full* source (a subset source still reads rows by the original record index), so the pipeline joins
it in its per-example load step, before shuffling has any say, and each example keeps its own row
through shuffling, resume and multi-process sharding.

Two formats are read:

(a) one ``.npy`` file of shape ``[N, *field_shape]`` (any field name maps to it);
(b) a directory of shards::

        <dir>/manifest.json
            {"num_records": N,
             "fields": {"<name>": {"shape": [...], "dtype": "int32"}, ...},
             "shards": [{"start": s, "end": e, "files": {"<name>": "<name>-00000.npy", ...}}, ...]}
        <dir>/<name>-00000.npy ...   rows for record indices [start, end), in order

    Shards are contiguous and cover [0, N) in order; every shard has a file for every field, of shape
    ``[end - start, *shape]`` and the declared dtype. ``manifest.json`` is written last (and atomically),
    so a directory without one is incomplete. Several fields may share a directory (an embedding run
    writes ``image_emb``, ``text_emb`` and ``index``).

An ``index`` field (int64, shape ``[]``), when present, holds each row's record index. A file that is
used as side file must be keyed by record index, so its ``index`` rows must be 0, 1, ..., N-1; that is
checked at the first and last row of every shard when it is opened (``open_side_field``). The same
``index`` field is what a subset source reads (``SideFieldReader(dir, field='index')``).

Files are memory-mapped (``np.load(mmap_mode='r')``) and opened lazily, so a reader pickles as its path
to grain worker processes.
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from clus_jax.data.fields import FieldSpec

MANIFEST = "manifest.json"
INDEX_FIELD = "index"
#: Per-record 0/1 field of an embedding output: 0 for a record that could not be embedded (skipped, counted).
VALID_FIELD = "valid"
#: The file names of a clustering output (``python -m clus_jax.cluster --out DIR``), read by the stages after it.
CENTERS_FILE = "centers.npy"  # float32 [K, D] (the fine centres with --levels)
COARSE_CENTERS_FILE = "coarse_centers.npy"
FINE_TO_COARSE_FILE = "fine_to_coarse.npy"
DEFAULT_SHARD_SIZE = 1 << 20
# Which stored dtype kinds may fill a declared dtype kind (values are range-checked per row).
_CASTABLE_KINDS = {"i": "iub", "u": "iub", "f": "fiu", "b": "b", "c": "cfiu"}


def castable(from_dtype: Any, to_dtype: Any) -> bool:
    """Whether values of ``from_dtype`` may fill a field of ``to_dtype`` (same kind of number)."""
    return np.dtype(from_dtype).kind in _CASTABLE_KINDS.get(np.dtype(to_dtype).kind, np.dtype(to_dtype).kind)


def _shard_name(field: str, shard: int) -> str:
    return f"{field}-{shard:05d}.npy"


def _read_manifest(path: str) -> dict[str, Any]:
    manifest_path = os.path.join(path, MANIFEST)
    if not os.path.isfile(manifest_path):
        raise FileNotFoundError(f"side file directory {path!r} has no {MANIFEST} (incomplete or not a side file)")
    try:
        with open(manifest_path, encoding="utf-8") as f:
            manifest = json.load(f)
        num_records = int(manifest["num_records"])
        fields = {str(k): FieldSpec(tuple(v["shape"]), v["dtype"]) for k, v in manifest["fields"].items()}
        shards = [(int(s["start"]), int(s["end"]), {str(k): str(v) for k, v in s["files"].items()})
                  for s in manifest["shards"]]
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"malformed {manifest_path!r}: {type(e).__name__}: {e}") from e
    expected = 0
    for start, end, files in shards:
        if start != expected or end < start:
            raise ValueError(f"{manifest_path!r}: shards must be contiguous from 0; shard [{start}, {end}) "
                             f"follows {expected}")
        missing = sorted(set(fields) - set(files))
        if missing:
            raise ValueError(f"{manifest_path!r}: shard [{start}, {end}) has no file for fields {missing}")
        expected = end
    if expected != num_records:
        raise ValueError(f"{manifest_path!r}: shards cover {expected} records but num_records is {num_records}")
    return {"num_records": num_records, "fields": fields, "shards": shards}


class SideFieldReader:
    """One field of a side file (format (a) or (b), see the module docstring), by record index.

    ``field`` picks the field of a directory: the one of that name, else the only field (not counting
    ``index`` unless ``field='index'``). ``reader[i]`` is row ``i`` as an array of ``spec.shape``.
    """

    def __init__(self, path: str | os.PathLike, field: str | None = None):
        self.path = os.path.expanduser(os.fspath(path))
        if os.path.isdir(self.path):
            manifest = _read_manifest(self.path)
            self.field = self._pick_field(manifest["fields"], field)
            self._spec = manifest["fields"][self.field]
            self._len = manifest["num_records"]
            shards = [(s, e, files[self.field]) for s, e, files in manifest["shards"] if e > s]
            self._starts = np.asarray([s for s, _, _ in shards], np.int64)
            self._ends = np.asarray([e for _, e, _ in shards], np.int64)
            self._files = [os.path.join(self.path, f) for _, _, f in shards]
        elif os.path.isfile(self.path):
            if not self.path.endswith(".npy"):
                raise ValueError(f"side file {self.path!r} must be a .npy file or a directory with a {MANIFEST}")
            try:
                array = np.load(self.path, mmap_mode="r")
            except (ValueError, OSError) as e:
                raise ValueError(f"cannot read side file {self.path!r}: {e}") from e
            if array.ndim < 1:
                raise ValueError(f"side file {self.path!r} holds a scalar; expected [num_records, ...] rows")
            self.field = field
            self._spec = FieldSpec(array.shape[1:], array.dtype)
            self._len = int(array.shape[0])
            self._starts, self._ends = np.zeros(1, np.int64), np.asarray([self._len], np.int64)
            self._files = [self.path]
        else:
            raise FileNotFoundError(f"side file {self.path!r} does not exist")
        self._arrays: dict[int, np.ndarray] = {}

    def _pick_field(self, fields: Mapping[str, FieldSpec], field: str | None) -> str:
        if field in fields:
            return field
        candidates = [name for name in fields if name != INDEX_FIELD or field == INDEX_FIELD]
        if len(candidates) == 1:
            return candidates[0]
        raise ValueError(f"side file {self.path!r} has fields {sorted(fields)}; "
                         f"{'no field ' + repr(field) if field else 'name the one to read'}")

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_arrays"] = {}
        return state

    @property
    def spec(self) -> FieldSpec:
        """Per-record shape and dtype of this field."""
        return self._spec

    def __len__(self) -> int:
        return self._len

    def __repr__(self) -> str:
        return f"SideFieldReader(path={self.path!r}, field={self.field!r}, records={self._len}, spec={self._spec})"

    def _shard_array(self, shard: int) -> np.ndarray:
        array = self._arrays.get(shard)
        if array is None:
            path = self._files[shard]
            try:
                array = np.load(path, mmap_mode="r")
            except (ValueError, OSError) as e:
                raise ValueError(f"cannot read side file shard {path!r}: {e}") from e
            rows = int(self._ends[shard] - self._starts[shard])
            if array.shape != (rows, *self._spec.shape) or array.dtype != np.dtype(self._spec.dtype):
                raise ValueError(f"side file shard {path!r} holds {array.dtype}{list(array.shape)}; expected "
                                 f"{self._spec.dtype}{[rows, *self._spec.shape]}")
            self._arrays[shard] = array  # Races between threads only open the same file twice.
        return array

    def __getitem__(self, index: int) -> np.ndarray:
        i = int(index)
        if not 0 <= i < self._len:
            raise IndexError(f"record index {i} out of range for side file {self.path!r} of {self._len} records")
        shard = int(np.searchsorted(self._ends, i, side="right"))
        return np.array(self._shard_array(shard)[i - int(self._starts[shard])])

    def chunks(self):
        """Yields the rows in order, one array per shard (or per million rows), for scans such as range checks."""
        for shard in range(len(self._files)):
            array = self._shard_array(shard)
            for lo in range(0, array.shape[0], 1 << 20):
                yield np.asarray(array[lo:lo + (1 << 20)])


def check_index_is_identity(path: str | os.PathLike) -> None:
    """Raises ValueError unless the ``index`` field of a side-file directory (if any) is 0..N-1 at every
    shard's first and last row, i.e. the file is keyed by record index."""
    path = os.path.expanduser(os.fspath(path))
    if not os.path.isdir(path) or INDEX_FIELD not in _read_manifest(path)["fields"]:
        return
    reader = SideFieldReader(path, field=INDEX_FIELD)
    for start, end in zip(reader._starts.tolist(), reader._ends.tolist()):
        for i in (start, end - 1):
            if int(reader[i]) != i:
                raise ValueError(f"side file {path!r} is not keyed by record index: row {i} has index "
                                 f"{int(reader[i])} (a side file's row i must belong to record i of the full source)")


def open_side_field(path: str | os.PathLike | SideFieldReader, name: str, num_records: int) -> SideFieldReader:
    """The reader of side field ``name`` at ``path`` (or the given reader), checked to hold one row per
    record of a source of ``num_records`` records and to be keyed by record index."""
    reader = path if isinstance(path, SideFieldReader) else SideFieldReader(path, field=name)
    if len(reader) != int(num_records):
        raise ValueError(f"side field {name!r} at {reader.path!r} has {len(reader)} rows but the source has "
                         f"{int(num_records)} records (a side file needs one row per record of the full source)")
    check_index_is_identity(reader.path)
    return reader


def check_spec(reader: SideFieldReader, name: str, declared: FieldSpec) -> None:
    """Raises ValueError when a side field's stored shape or dtype kind cannot fill the declared field."""
    stored = reader.spec
    if stored.shape != declared.shape or not castable(stored.dtype, declared.dtype):
        raise ValueError(f"side field {name!r} at {reader.path!r} holds {stored.dtype}{list(stored.shape)} per "
                         f"record but the batch declares {declared.dtype}{list(declared.shape)}")


class SideFileWriter:
    """Writes a side file directory (format (b)) incrementally: ``write(arrays)`` appends rows to every
    field, ``close()`` flushes the last shard and writes the manifest. Usable as a context manager."""

    def __init__(self, path: str | os.PathLike, specs: Mapping[str, FieldSpec], *,
                 shard_size: int = DEFAULT_SHARD_SIZE, overwrite: bool = False):
        if not specs:
            raise ValueError("a side file needs at least one field")
        if shard_size <= 0:
            raise ValueError(f"shard_size must be positive, got {shard_size}")
        self.path = os.path.expanduser(os.fspath(path))
        if os.path.exists(os.path.join(self.path, MANIFEST)) and not overwrite:
            raise FileExistsError(f"side file {self.path!r} already exists (pass overwrite=True to replace it)")
        os.makedirs(self.path, exist_ok=True)
        if overwrite and os.path.exists(os.path.join(self.path, MANIFEST)):
            os.remove(os.path.join(self.path, MANIFEST))
        self.specs = {str(k): FieldSpec(v.shape, v.dtype) for k, v in specs.items()}
        self._shard_size = int(shard_size)
        self._pending: dict[str, list[np.ndarray]] = {k: [] for k in self.specs}
        self._pending_rows = 0
        self._shards: list[dict[str, Any]] = []
        self._written = 0
        self._closed = False

    def write(self, arrays: Mapping[str, np.ndarray]) -> None:
        """Appends the same number of rows to every field (``arrays[name]``: ``[n, *shape]``)."""
        if self._closed:
            raise ValueError("write() on a closed SideFileWriter")
        if set(arrays) != set(self.specs):
            raise ValueError(f"write() needs exactly the fields {sorted(self.specs)}, got {sorted(arrays)}")
        n = None
        for name, spec in self.specs.items():
            a = np.asarray(arrays[name])
            if a.shape[1:] != spec.shape or not castable(a.dtype, spec.dtype):
                raise ValueError(f"field {name!r}: rows of {a.dtype}{list(a.shape[1:])} do not fit "
                                 f"{spec.dtype}{list(spec.shape)}")
            if n is not None and a.shape[0] != n:
                raise ValueError(f"write() got {n} rows for one field and {a.shape[0]} for {name!r}")
            n = a.shape[0]
        for name, spec in self.specs.items():
            self._pending[name].append(np.asarray(arrays[name]).astype(spec.dtype, copy=False))
        self._pending_rows += n
        while self._pending_rows >= self._shard_size:
            self._flush(self._shard_size)

    def _flush(self, rows: int) -> None:
        shard = len(self._shards)
        files = {}
        for name in self.specs:
            data = np.concatenate(self._pending[name]) if len(self._pending[name]) > 1 else self._pending[name][0]
            files[name] = _shard_name(name, shard)
            target = os.path.join(self.path, files[name])
            with open(target + ".tmp", "wb") as f:
                np.save(f, np.ascontiguousarray(data[:rows]))
            os.replace(target + ".tmp", target)
            self._pending[name] = [data[rows:]] if data.shape[0] > rows else []
        self._shards.append({"start": self._written, "end": self._written + rows, "files": files})
        self._written += rows
        self._pending_rows -= rows

    def close(self) -> str:
        """Writes the remaining rows and the manifest; returns the directory."""
        if self._closed:
            return self.path
        if self._pending_rows:
            self._flush(self._pending_rows)
        manifest = {"num_records": self._written,
                    "fields": {k: {"shape": list(v.shape), "dtype": v.dtype} for k, v in self.specs.items()},
                    "shards": self._shards}
        tmp = os.path.join(self.path, MANIFEST + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=1)
        os.replace(tmp, os.path.join(self.path, MANIFEST))
        self._closed = True
        return self.path

    def __enter__(self) -> SideFileWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()


def write_side_file(path: str | os.PathLike, arrays: Mapping[str, np.ndarray], *,
                    shard_size: int = DEFAULT_SHARD_SIZE, overwrite: bool = False) -> str:
    """Writes ``arrays`` (name -> ``[N, *shape]``, the same N) as a side file directory (format (b)).

    Row i of every array belongs to record i. Returns the directory.
    """
    arrays = {k: np.asarray(v) for k, v in arrays.items()}
    specs = {k: FieldSpec(v.shape[1:], v.dtype) for k, v in arrays.items()}
    with SideFileWriter(path, specs, shard_size=shard_size, overwrite=overwrite) as writer:
        writer.write(arrays)
    return writer.path
