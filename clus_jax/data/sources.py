"""Random-access image-caption sources for the grain pipeline.

Every source implements grain's ``RandomAccessDataSource`` protocol (``__len__``, ``__getitem__``,
``__repr__``), pickles cheaply to grain worker processes (open files and readers are re-created
lazily in each process) and returns raw records ``{'image': encoded bytes | ndarray | None,
'caption': str | bytes | None, ...}``. Decoding and validation happen later, in ``transforms``, so a
corrupt record is skipped and counted instead of raising. A record that cannot even be parsed raises
from ``__getitem__``; the pipeline counts that as skipped too.

Sources
  * ``ArrayRecordSource``: this project's msgpack records (``records.py``), or generic ArrayRecord
    files of msgpack maps or ``tf.train.Example`` protos, with configurable image and caption keys.
  * ``TfdsSource``: a prepared TFDS dataset through ``tfds.data_source`` (no TensorFlow needed).
  * ``TarShardSource``: WebDataset-style tar shards, indexed once with ``tarfile`` and read with
    ``os.pread`` so they support global shuffling.
  * ``SyntheticSource`` (``synthetic.py``) and the embedded dataset (``embedded.py``).
  * ``SubsetSource``: any of these restricted to a list of record indices (``data.subset``).
"""
from __future__ import annotations

import json
import os
import tarfile
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np

from clus_jax.data import records as records_lib

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
CAPTION_EXTENSIONS = ("txt", "caption", "json")
_JSON_CAPTION_FIELDS = ("caption", "text", "txt")


def _pick(record: dict[str, Any], key: str) -> Any:
    """record[key]; a one-element list (tf.Example feature) is unwrapped."""
    value = record.get(key)
    if isinstance(value, list):
        value = value[0] if value else None
    return value


class ArrayRecordSource:
    """ArrayRecord files read by random access through ``grain.sources.ArrayRecordDataSource``.

    ``paths`` is a glob, a comma-separated list of globs, or a list of files. Records are parsed with
    ``records.decode_record``; ``image_key`` and ``caption_key`` name the fields to use. All other
    fields are passed through.
    """

    def __init__(self, paths: str | Sequence[str], *, image_key: str = "image", caption_key: str = "caption"):
        import grain

        self._files = records_lib.expand_paths(paths, what="ArrayRecord")
        for f in self._files:
            if not os.access(f, os.R_OK):
                raise FileNotFoundError(f"ArrayRecord file {f!r} is not readable")
        self._image_key = image_key
        self._caption_key = caption_key
        try:
            self._source = grain.sources.ArrayRecordDataSource(self._files)
        except RuntimeError as e:
            raise OSError(f"cannot open ArrayRecord files {self._files!r}: {e}") from e

    @property
    def files(self) -> list[str]:
        return list(self._files)

    def __len__(self) -> int:
        return len(self._source)

    def __repr__(self) -> str:
        return (f"ArrayRecordSource(files={self._files!r}, image_key={self._image_key!r}, "
                f"caption_key={self._caption_key!r})")

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = records_lib.decode_record(self._source[int(index)])
        out = {k: v for k, v in record.items() if k not in (self._image_key, self._caption_key)}
        out["image"] = _pick(record, self._image_key)
        out["caption"] = _pick(record, self._caption_key)
        return out


def _import_tfds():
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise ImportError(
            "source='tfds' needs the 'tensorflow-datasets' package (TensorFlow itself is not needed): "
            "pip install tensorflow-datasets") from e
    return tfds


class TfdsSource:
    """A prepared TFDS dataset (ArrayRecord file format) via ``tfds.data_source``.

    The underlying source is opened lazily, so this object pickles to grain workers.
    """

    def __init__(self, name: str, *, split: str = "train", data_dir: str | None = None,
                 image_key: str = "image", caption_key: str = "caption"):
        _import_tfds()
        if data_dir is not None and not os.path.isdir(os.path.expanduser(data_dir)):
            raise FileNotFoundError(f"TFDS data_dir {data_dir!r} does not exist")
        self._name, self._split = name, split
        self._data_dir = os.path.expanduser(data_dir) if data_dir else None
        self._image_key, self._caption_key = image_key, caption_key
        self._source = None
        self._len = len(self._get())

    def _get(self):
        if self._source is None:
            tfds = _import_tfds()
            try:
                self._source = tfds.data_source(self._name, split=self._split, data_dir=self._data_dir)
            except Exception as e:
                where = self._data_dir or "the default TFDS data_dir"
                raise FileNotFoundError(
                    f"cannot open TFDS dataset {self._name!r} split {self._split!r} in {where}: {e}") from e
        return self._source

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_source"] = None
        return state

    def __len__(self) -> int:
        return self._len

    def __repr__(self) -> str:
        return (f"TfdsSource(name={self._name!r}, split={self._split!r}, data_dir={self._data_dir!r}, "
                f"image_key={self._image_key!r}, caption_key={self._caption_key!r})")

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self._get()[int(index)]
        out = {k: v for k, v in record.items() if k not in (self._image_key, self._caption_key)}
        out["image"] = record.get(self._image_key)
        out["caption"] = record.get(self._caption_key)
        return out


def _split_member_name(name: str) -> tuple[str, str]:
    """WebDataset convention: key = path up to the first dot of the basename, extension = the rest."""
    directory, base = os.path.split(name)
    stem, dot, ext = base.partition(".")
    return (os.path.join(directory, stem) if directory else stem), ext.lower() if dot else ""


class TarShardSource:
    """WebDataset-style tar shards with random access.

    Each shard is indexed once with ``tarfile`` (data offset and size of every member, grouped by
    sample key) and members are read with ``os.pread``. ``image_key`` / ``caption_key`` name the
    member extensions to use; by default the first present of jpg/jpeg/png/webp and of
    txt/caption/json (for json, its "caption" or "text" field). ``extra_keys`` names more member
    extensions (e.g. ``cls``, a class index) whose raw bytes each record carries under that name (None where
    a sample has none). Shards must be uncompressed tars.
    """

    def __init__(self, paths: str | Sequence[str], *, image_key: str | None = None,
                 caption_key: str | None = None, extra_keys: Sequence[str] = ()):
        self._files = records_lib.expand_paths(paths, what="tar shard")
        self._image_exts = (image_key.lower(),) if image_key else IMAGE_EXTENSIONS
        self._caption_exts = (caption_key.lower(),) if caption_key else CAPTION_EXTENSIONS
        self._extra_keys = tuple(k.lower() for k in extra_keys)
        extra: dict[str, list] = {k: [] for k in self._extra_keys}
        columns: dict[str, list] = {k: [] for k in ("shard", "img_off", "img_size", "cap_off", "cap_size",
                                                     "cap_json")}
        self._keys: list[str] = []
        for shard, path in enumerate(self._files):
            for key, members in self._index_shard(path):
                img = next(((members[e], e) for e in self._image_exts if e in members), None)
                cap = next(((members[e], e) for e in self._caption_exts if e in members), None)
                if img is None and cap is None:
                    continue
                self._keys.append(key)
                columns["shard"].append(shard)
                columns["img_off"].append(img[0][0] if img else -1)
                columns["img_size"].append(img[0][1] if img else 0)
                columns["cap_off"].append(cap[0][0] if cap else -1)
                columns["cap_size"].append(cap[0][1] if cap else 0)
                columns["cap_json"].append(bool(cap and cap[1].endswith("json")))
                for k in self._extra_keys:
                    extra[k].append(members.get(k, (-1, 0)))
        self._shard = np.asarray(columns["shard"], np.int32)
        self._img = np.stack([np.asarray(columns["img_off"], np.int64),
                              np.asarray(columns["img_size"], np.int64)], axis=-1).reshape(-1, 2)
        self._cap = np.stack([np.asarray(columns["cap_off"], np.int64),
                              np.asarray(columns["cap_size"], np.int64)], axis=-1).reshape(-1, 2)
        self._cap_json = np.asarray(columns["cap_json"], bool)
        self._extra = {k: np.asarray(v, np.int64).reshape(-1, 2) for k, v in extra.items()}
        self._fds: dict[int, int] = {}
        self._lock = threading.Lock()

    @staticmethod
    def _index_shard(path: str) -> list[tuple[str, dict[str, tuple[int, int]]]]:
        try:
            tar = tarfile.open(path, "r:")
        except tarfile.ReadError as e:
            raise OSError(f"cannot index tar shard {path!r} (random access needs an uncompressed tar): {e}") from e
        except OSError as e:
            raise OSError(f"cannot open tar shard {path!r}: {e}") from e
        samples: dict[str, dict[str, tuple[int, int]]] = {}
        with tar:
            for m in tar:
                if not m.isfile():
                    continue
                key, ext = _split_member_name(m.name)
                if key.startswith("__") or not ext:
                    continue
                samples.setdefault(key, {})[ext] = (m.offset_data, m.size)
        return list(samples.items())

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_fds"] = {}
        state["_lock"] = None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __del__(self):
        for fd in getattr(self, "_fds", {}).values():
            try:
                os.close(fd)
            except OSError:
                pass

    def _fd(self, shard: int) -> int:
        fd = self._fds.get(shard)
        if fd is None:
            with self._lock:
                fd = self._fds.get(shard)
                if fd is None:
                    fd = os.open(self._files[shard], os.O_RDONLY)
                    self._fds[shard] = fd
        return fd

    def _read(self, shard: int, offset: int, size: int) -> bytes | None:
        if offset < 0:
            return None
        data = os.pread(self._fd(shard), int(size), int(offset))
        if len(data) != size:
            raise OSError(f"short read from {self._files[shard]!r} at offset {offset}")
        return data

    def __len__(self) -> int:
        return len(self._keys)

    def __repr__(self) -> str:
        return f"TarShardSource(files={self._files!r}, samples={len(self._keys)})"

    def key(self, index: int) -> str:
        return self._keys[int(index)]

    def __getitem__(self, index: int) -> dict[str, Any]:
        i = int(index)
        shard = int(self._shard[i])
        image = self._read(shard, *self._img[i])
        caption: Any = self._read(shard, *self._cap[i])
        if caption is not None and self._cap_json[i]:
            try:
                meta = json.loads(caption)
            except ValueError:
                meta = None
            caption = None
            if isinstance(meta, dict):
                caption = next((meta[f] for f in _JSON_CAPTION_FIELDS if isinstance(meta.get(f), str)), None)
            elif isinstance(meta, str):
                caption = meta
        out = {"image": image, "caption": caption, "__key__": self._keys[i]}
        for k, where in self._extra.items():
            out[k] = self._read(shard, *where[i])
        return out


class SubsetSource:
    """``base`` restricted to some of its records: record j is ``base[indices[j]]``.

    ``indices`` is anything with ``len`` and integer ``[j]`` (an array or a ``SideFieldReader``, which
    pickles as its path). Indices may repeat (a record drawn twice is two records of the subset).
    ``original_index(j)`` is the index in the full source, by which side fields are keyed.
    """

    def __init__(self, base: Any, indices: Any, *, name: str = "subset"):
        self._base = base
        self._indices = indices
        self._name = name
        if len(indices) == 0:
            raise ValueError(f"{name} is empty")

    @property
    def base(self) -> Any:
        """The full source (the innermost one when subsets are nested)."""
        return self._base.base if isinstance(self._base, SubsetSource) else self._base

    def original_index(self, index: int) -> int:
        i = int(self._indices[int(index)])
        return self._base.original_index(i) if isinstance(self._base, SubsetSource) else i

    def __len__(self) -> int:
        return len(self._indices)

    def __repr__(self) -> str:
        return f"SubsetSource({self._name}, records={len(self)}, base={self._base!r})"

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self._base[int(self._indices[int(index)])]


def original_index(source: Any, index: int) -> int:
    """Index in the full source of record ``index`` of ``source`` (itself unless it is a subset)."""
    return source.original_index(index) if isinstance(source, SubsetSource) else int(index)


def full_source(source: Any) -> Any:
    """The source that record indices (and side files) refer to."""
    return source.base if isinstance(source, SubsetSource) else source


def load_subset_indices(path: str, num_records: int):
    """The record indices at ``path`` (a ``.npy`` of integers, or a side-file directory with an ``index``
    field), checked to be 1-D integers in ``[0, num_records)``; memory-mapped, not loaded."""
    from clus_jax.data import side_fields

    reader = side_fields.SideFieldReader(path, field=side_fields.INDEX_FIELD)
    if reader.spec.shape != () or np.dtype(reader.spec.dtype).kind not in "iu":
        raise ValueError(f"subset {reader.path!r} must hold one integer record index per row, got "
                         f"{reader.spec.dtype}{list(reader.spec.shape)} rows")
    if len(reader) == 0:
        raise ValueError(f"subset {reader.path!r} is empty")
    for chunk in reader.chunks():
        lo, hi = int(chunk.min()), int(chunk.max())
        if lo < 0 or hi >= num_records:
            bad = lo if lo < 0 else hi
            raise ValueError(f"subset {reader.path!r} holds record index {bad}, outside the source's "
                             f"{num_records} records")
    return reader


def make_source(data_config: Any):
    """Builds the source named by ``data_config['source']``, restricted to ``data_config['subset']`` when
    that is set (see ``pipeline`` for the config keys).

    ``data_config`` may be an ``ml_collections.ConfigDict`` or a plain mapping.
    """
    source = _make_full_source(data_config)
    subset = data_config.get("subset") or None
    if subset:
        source = SubsetSource(source, load_subset_indices(subset, len(source)), name=f"subset {subset!r}")
    return source


def _make_full_source(data_config: Any):
    from clus_jax.data import embedded, synthetic

    get = data_config.get
    kind = get("source")
    path = get("path") or None
    image_key = get("image_key") or None
    caption_key = get("caption_key") or None
    if kind == "embedded":
        return ArrayRecordSource(embedded.train_files(embedded.build_embedded_dataset(get("cache_dir") or None)))
    if kind == "synthetic":
        return synthetic.SyntheticSource(int(get("synthetic_size") or 10_000))
    if kind in ("array_record", "tfds", "tar") and not path:
        what = {"array_record": "a glob of ArrayRecord files", "tfds": "the TFDS dataset name",
                "tar": "a glob of tar shards"}[kind]
        raise ValueError(f"source={kind!r} needs data_config.path ({what})")
    if kind == "array_record":
        return ArrayRecordSource(path, image_key=image_key or "image", caption_key=caption_key or "caption")
    if kind == "tfds":
        return TfdsSource(path, split=get("split") or "train", data_dir=get("tfds_data_dir") or None,
                          image_key=image_key or "image", caption_key=caption_key or "caption")
    if kind == "tar":
        return TarShardSource(path, image_key=image_key, caption_key=caption_key)
    raise ValueError(f"unknown data source {kind!r}; expected embedded, synthetic, array_record, tfds or tar")
