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
    writes ``image_emb``, ``text_emb``, ``index`` and ``valid``). Shard ``k`` holds the records
    ``[k * S, (k + 1) * S)`` for a shard size ``S`` (the last one shorter).

    ``SideFileWriter`` is the one writer (``python -m clus_jax.embed``, ``python -m clus_jax.cluster --topk``,
    ``write_side_file``) and ``manifest()`` the one manifest; ``SideFieldReader`` the one reader.

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
from etils import epath

from clus_jax.common.files import atomic_save_npy, atomic_write_json
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


def shard_name(field: str, shard: int) -> str:
    """The file of ``field``'s rows in shard ``shard``: ``<field>-<shard:05d>.npy``."""
    return f"{field}-{shard:05d}.npy"


def shard_ranges(num_records: int, shard_size: int) -> list[tuple[int, int]]:
    """[start, end) of every shard: fixed size, the last one shorter."""
    return [(s, min(s + shard_size, num_records)) for s in range(0, num_records, shard_size)]


def process_shards(num_shards: int, process_index: int, process_count: int) -> range:
    """The contiguous run of shard numbers that process ``process_index`` of ``process_count`` writes."""
    return range(num_shards * process_index // process_count, num_shards * (process_index + 1) // process_count)


def field_entries(specs: Mapping[str, FieldSpec]) -> dict[str, dict[str, Any]]:
    """The manifest's ``fields``: name -> {"shape": [...], "dtype": "..."}."""
    return {name: {"shape": list(spec.shape), "dtype": spec.dtype} for name, spec in specs.items()}


def manifest(specs: Mapping[str, FieldSpec], ranges: list[tuple[int, int]]) -> dict[str, Any]:
    """The manifest of a side file of these fields and shards (the schema in the module docstring)."""
    return {"num_records": ranges[-1][1] if ranges else 0, "fields": field_entries(specs),
            "shards": [{"start": s, "end": e, "files": {name: shard_name(name, k) for name in specs}}
                       for k, (s, e) in enumerate(ranges)]}


def field_specs(path: str | os.PathLike) -> dict[str, FieldSpec]:
    """The fields of a side-file directory, as its manifest declares them."""
    return _read_manifest(os.path.expanduser(os.fspath(path)))["fields"]


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

    def check_files(self) -> None:
        """Opens every shard (memory-mapped: its header and size, no row is read), so one that is missing, cut
        short or of another shape fails now, with ValueError naming it, not in the middle of a pass."""
        for shard in range(len(self._files)):
            self._shard_array(shard)

    def __getitem__(self, index: int) -> np.ndarray:
        i = int(index)
        if not 0 <= i < self._len:
            raise IndexError(f"record index {i} out of range for side file {self.path!r} of {self._len} records")
        shard = int(np.searchsorted(self._ends, i, side="right"))
        return np.array(self._shard_array(shard)[i - int(self._starts[shard])])

    def array(self) -> np.ndarray:
        """Every row, in order, as one array ``[len(self), *spec.shape]`` (read shard by shard)."""
        chunks = list(self.chunks())
        return np.concatenate(chunks) if chunks else np.zeros((0, *self._spec.shape), self._spec.dtype)

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
    """Writes a side file directory (format (b)), the one writer of the format.

    Shard ``k`` holds the rows ``[k * shard_size, (k + 1) * shard_size)`` (the last one shorter), so the files and
    the manifest follow from the number of rows alone. Every file is written under a temporary name and renamed,
    and the manifest comes last. Two ways to fill it:

    - ``write(arrays)`` appends rows in order; ``close()`` writes the last shard and the manifest (usable as a
      context manager): one process that makes every row in order.
    - ``num_records`` given: ``write_shard(k, arrays)`` writes shard ``k`` alone and ``has_shard(k)`` says whether
      it is there, from an earlier run too (such a writer continues a directory instead of refusing it), so
      several processes can write their own shards (``process_shards``) and a re-run can skip finished ones.
      ``close()`` writes the manifest once every shard is there (whichever process completes the last).

    ``close()`` returns whether the manifest was written, i.e. whether the side file is complete.
    """

    def __init__(self, path: str | os.PathLike, specs: Mapping[str, FieldSpec], *,
                 shard_size: int = DEFAULT_SHARD_SIZE, num_records: int | None = None, overwrite: bool = False):
        if not specs:
            raise ValueError("a side file needs at least one field")
        if shard_size <= 0:
            raise ValueError(f"shard_size must be positive, got {shard_size}")
        self.path = os.path.expanduser(os.fspath(path))
        self._dir = epath.Path(self.path)
        finished = self._dir / MANIFEST
        if finished.exists() and not overwrite and num_records is None:
            raise FileExistsError(f"side file {self.path!r} already exists (pass overwrite=True to replace it)")
        self._dir.mkdir(parents=True, exist_ok=True)
        if overwrite and finished.exists():
            finished.unlink()
        self.specs = {str(k): FieldSpec(v.shape, v.dtype) for k, v in specs.items()}
        self.shard_size = int(shard_size)
        self.num_records = None if num_records is None else int(num_records)
        self._pending: dict[str, list[np.ndarray]] = {k: [] for k in self.specs}
        self._pending_rows = 0
        self._written = 0
        self._closed = False

    @property
    def ranges(self) -> list[tuple[int, int]]:
        """``[start, end)`` of every shard (with ``num_records``; else of the shards written so far)."""
        return shard_ranges(self._written if self.num_records is None else self.num_records, self.shard_size)

    def _checked(self, arrays: Mapping[str, np.ndarray]) -> int:
        """The number of rows of ``arrays``, checked to be the same for every field and to fit its spec."""
        if self._closed:
            raise ValueError("write on a closed SideFileWriter")
        if set(arrays) != set(self.specs):
            raise ValueError(f"write needs exactly the fields {sorted(self.specs)}, got {sorted(arrays)}")
        n = None
        for name, spec in self.specs.items():
            a = np.asarray(arrays[name])
            if a.shape[1:] != spec.shape or not castable(a.dtype, spec.dtype):
                raise ValueError(f"field {name!r}: rows of {a.dtype}{list(a.shape[1:])} do not fit "
                                 f"{spec.dtype}{list(spec.shape)}")
            if n is not None and a.shape[0] != n:
                raise ValueError(f"write got {n} rows for one field and {a.shape[0]} for {name!r}")
            n = a.shape[0]
        return int(n)

    def write(self, arrays: Mapping[str, np.ndarray]) -> None:
        """Appends the same number of rows to every field (``arrays[name]``: ``[n, *shape]``)."""
        n = self._checked(arrays)
        for name, spec in self.specs.items():
            self._pending[name].append(np.asarray(arrays[name]).astype(spec.dtype, copy=False))
        self._pending_rows += n
        while self._pending_rows >= self.shard_size:
            self._flush(self.shard_size)

    def _flush(self, rows: int) -> None:
        arrays = {}
        for name in self.specs:
            data = np.concatenate(self._pending[name]) if len(self._pending[name]) > 1 else self._pending[name][0]
            arrays[name] = data[:rows]
            self._pending[name] = [data[rows:]] if data.shape[0] > rows else []
        self._save(self._written // self.shard_size, arrays)
        self._written += rows
        self._pending_rows -= rows

    def _save(self, shard: int, arrays: Mapping[str, np.ndarray]) -> None:
        for name, spec in self.specs.items():
            array = np.asarray(arrays[name]).astype(spec.dtype, copy=False)
            atomic_save_npy(self._dir / shard_name(name, shard), array)

    def write_shard(self, shard: int, arrays: Mapping[str, np.ndarray]) -> None:
        """Writes every field's rows of shard ``shard`` (needs ``num_records``)."""
        if self.num_records is None:
            raise ValueError("write_shard needs a SideFileWriter made with num_records")
        start, end = self.ranges[shard]
        n = self._checked(arrays)
        if n != end - start:
            raise ValueError(f"shard {shard} holds records [{start}, {end}); write_shard got {n} rows")
        self._save(shard, arrays)

    def has_shard(self, shard: int) -> bool:
        """Whether every field's file of shard ``shard`` is there."""
        return all((self._dir / shard_name(name, shard)).exists() for name in self.specs)

    def read_shard(self, shard: int, field: str) -> np.ndarray:
        """The rows of ``field`` in shard ``shard`` as written (before the manifest exists too)."""
        with (self._dir / shard_name(field, shard)).open("rb") as f:
            return np.load(f)

    def close(self) -> bool:
        """Writes the remaining rows, and the manifest once every shard is there; returns whether it was."""
        if self._closed:
            return True
        if self._pending_rows:
            self._flush(self._pending_rows)
        if not all(self.has_shard(k) for k in range(len(self.ranges))):
            return False
        atomic_write_json(self._dir / MANIFEST, manifest(self.specs, self.ranges))
        self._closed = True
        return True

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
