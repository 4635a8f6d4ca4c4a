"""Training input pipeline on grain: global shuffle, process sharding, decode + augment, skip-and-count,
batching and tokenization, with exactly resumable iterator state.

``data_config`` is ``config.data``: its keys, defaults and checks are in ``data_config.py``.

Batch fields. ``fields`` (``dict[str, FieldSpec]``, see ``fields.py``) declares what a batch holds:
'image' (decoded and augmented), 'text' (the tokenised caption) and any extra field, read from the
record's own key of that name or, when ``side_fields`` names it, from its side file at the record's
original index. None means image + text. A batch has exactly the declared keys plus 'skipped'; without
'text' no caption is needed or tokenised, without 'image' no image is decoded. A record is invalid
when a declared field is missing or unusable (an extra field of another shape or kind of number, or
whose values do not fit the declared dtype).

Order of operations. The global example stream is g = 0, 1, 2, ... (infinite): epoch ``g // N``,
record ``shuffle_epoch(g % N)`` where every epoch has its own seeded permutation of the N records.
Process p of n takes g = p, p + n, p + 2n, ..., so one step's local batches of all processes form one
global batch without overlap (as long as no record is skipped). Each example is decoded and augmented
with randomness drawn from (seed, epoch, record index); invalid records (undecodable image, empty or
non-UTF-8 caption, unparsable record, missing or ill-shaped extra field) are dropped while filling a
batch and counted in ``'skipped'``.
The iterator state is the position in the stream, so ``set_state(get_state())`` reproduces exactly the
batches an uninterrupted run would see next, with or without worker processes (the batches do not
depend on ``num_workers``). A saved state restores into an iterator built with the same source, subset,
seed, batch size, process count and ``num_workers``.
"""
from __future__ import annotations

import atexit
import os
import threading
import weakref
from collections.abc import Callable, Mapping
from typing import Any

import grain
import ml_collections
import numpy as np
from absl import logging

from clus_jax.data import side_fields as side_fields_lib
from clus_jax.data import sources as sources_lib
from clus_jax.data import transforms
from clus_jax.data.data_config import resolve_data_config
from clus_jax.data.fields import IMAGE, SKIPPED, TEXT, FieldSpec, extra_fields, image_field

_STREAM_LENGTH = 2**62
_MAX_CONSECUTIVE_INVALID = 10_000


def _epoch_seed(seed: int, epoch: int) -> int:
    return int(np.random.SeedSequence([seed & ((1 << 64) - 1), epoch]).generate_state(1, np.uint32)[0])


def shuffled_record_index(position: int, num_records: int, seed: int) -> tuple[int, int]:
    """(epoch, record index) read at global stream ``position``: each epoch is a seeded permutation."""
    epoch, pos = divmod(int(position), num_records)
    if num_records == 1:
        return epoch, 0
    return epoch, int(grain.experimental.index_shuffle(pos, max_index=num_records - 1,
                                                       seed=_epoch_seed(seed, epoch), rounds=4))


def _conform(value: Any, spec: FieldSpec) -> np.ndarray:
    """``value`` as an array of ``spec``; raises ValueError saying why it does not fit.

    A flat list of the right size (a ``tf.train.Example`` feature) is reshaped; otherwise the shape must
    match exactly. Numbers of a compatible kind are cast: integers only when every value fits, floats
    (rounded to the declared precision) unless a finite value overflows.
    """
    if value is None:
        raise ValueError("missing")
    try:
        array = np.asarray(value)
    except Exception as e:  # Ragged lists and other odd values.
        raise ValueError(f"not an array ({type(e).__name__})") from None
    if array.shape != spec.shape:
        if array.ndim <= 1 and array.size == int(np.prod(spec.shape, dtype=np.int64)):
            array = array.reshape(spec.shape)
        else:
            raise ValueError(f"shape {list(array.shape)}, expected {list(spec.shape)}")
    if not side_fields_lib.castable(array.dtype, spec.dtype):
        raise ValueError(f"dtype {array.dtype}, expected {spec.dtype}")
    if array.dtype == np.dtype(spec.dtype):
        return array
    with np.errstate(all="ignore"):
        out = array.astype(spec.dtype)
    if np.dtype(spec.dtype).kind in "fc":
        fits = bool(np.all(np.isfinite(out) | ~np.isfinite(array)))
    else:
        fits = bool(np.array_equal(out, array))
    if not fits:
        raise ValueError(f"values do not fit {spec.dtype}")
    return out


class _LoadExample:
    """Maps a global stream position to one decoded example with its declared fields (picklable, for
    worker processes): ``{'valid': bool, 'image'?, 'caption'?, <extra>...}``."""

    def __init__(self, source: Any, *, seed: int, image_transform: transforms.TrainTransform | None,
                 need_caption: bool, extras: Mapping[str, FieldSpec],
                 side_readers: Mapping[str, side_fields_lib.SideFieldReader]):
        self._source = source
        self._n = len(source)
        if self._n <= 0:
            raise ValueError(f"data source {source!r} is empty")
        if self._n > 2**32:
            raise ValueError("data sources larger than 2**32 records are not supported")
        self._seed = int(seed)
        self._image_transform = image_transform
        self._need_caption = bool(need_caption)
        self._extras = dict(extras)
        self._side = dict(side_readers)
        self._subset = isinstance(source, sources_lib.SubsetSource)
        self._warned: set[str] = set()

    def _warn_once(self, what: str, message: str, *args: Any) -> None:
        if what not in self._warned:
            self._warned.add(what)
            logging.warning(message, *args)

    def __call__(self, position: int) -> dict[str, Any]:
        epoch, index = shuffled_record_index(position, self._n, self._seed)
        invalid = {"valid": False}
        try:
            record = self._source[index]
        except Exception as e:  # A corrupt record must not stop training; it is counted as skipped.
            self._warn_once("record", "skipping unreadable record %d of %r: %s: %s", index, self._source,
                            type(e).__name__, e)
            return invalid
        if not isinstance(record, Mapping):
            return invalid
        out: dict[str, Any] = {"valid": True}
        if self._need_caption:
            caption = transforms.clean_caption(record.get("caption"))
            if caption is None:
                return invalid
            out["caption"] = caption
        if self._image_transform is not None:
            try:
                out[IMAGE] = self._image_transform.augment(record.get("image"), epoch=epoch, index=index)
            except transforms.InvalidRecord:
                return invalid
        if self._extras:
            original = sources_lib.original_index(self._source, index) if self._subset else index
            for name, spec in self._extras.items():
                reader = self._side.get(name)
                value = reader[original] if reader is not None else record.get(name)
                try:
                    out[name] = _conform(value, spec)
                except ValueError as e:
                    where = f"side file {reader.path!r}" if reader is not None else "the record"
                    self._warn_once(name, "skipping record %d: field %r from %s: %s", original, name, where, e)
                    return invalid
        return out


class _SkipCountBatchIterator(grain.DatasetIterator):
    """Fills each batch with valid examples only, counting the invalid ones it passes over."""

    def __init__(self, parent: grain.DatasetIterator, batch_size: int, fields: Mapping[str, FieldSpec | None],
                 tokenizer: Callable[[list[str]], np.ndarray] | None, max_consecutive_invalid: int):
        super().__init__(parent)
        self._batch_size = batch_size
        self._fields = dict(fields)
        self._tokenizer = tokenizer
        self._max_invalid = max_consecutive_invalid
        self._consecutive_invalid = 0

    def __next__(self) -> dict[str, np.ndarray]:
        examples, skipped = [], 0
        while len(examples) < self._batch_size:
            ex = next(self._parent)
            if not ex["valid"]:
                skipped += 1
                self._consecutive_invalid += 1
                if self._consecutive_invalid >= self._max_invalid:
                    raise RuntimeError(
                        f"{self._consecutive_invalid} consecutive records could not be used (undecodable "
                        f"image, missing caption or a missing or ill-shaped field of {sorted(self._fields)}); "
                        "check data_config.path, image_key, caption_key and side_fields")
                continue
            self._consecutive_invalid = 0
            examples.append(ex)
        batch: dict[str, np.ndarray] = {}
        for name, spec in self._fields.items():
            if name == TEXT:
                batch[TEXT] = self._tokenize([ex["caption"] for ex in examples], spec)
            elif name == IMAGE:
                batch[IMAGE] = np.stack([ex[IMAGE] for ex in examples]).astype(np.uint8, copy=False)
            else:
                batch[name] = np.stack([ex[name] for ex in examples]).astype(spec.dtype, copy=False)
        batch[SKIPPED] = np.int64(skipped)
        return batch

    def _tokenize(self, captions: list[str], spec: FieldSpec | None) -> np.ndarray:
        text = np.asarray(self._tokenizer(captions))
        if text.ndim != 2 or text.shape[0] != self._batch_size:
            raise ValueError(f"tokenizer must return [batch, length] ids, got shape {text.shape}")
        if spec is not None and text.shape[1:] != spec.shape:
            raise ValueError(f"tokenizer returns {text.shape[1]} ids per caption but the batch field 'text' "
                             f"declares {list(spec.shape)}")
        return text.astype(np.int32 if spec is None else spec.dtype, copy=False)

    def get_state(self) -> dict[str, Any]:
        return self._parent.get_state()

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state)
        self._consecutive_invalid = 0

    def __str__(self) -> str:
        return f"SkipCountBatchIterator(batch_size={self._batch_size}, fields={sorted(self._fields)})"


class _SkipCountBatchIterDataset(grain.IterDataset):
    def __init__(self, parent: grain.IterDataset, batch_size: int, fields: Mapping[str, FieldSpec | None],
                 tokenizer: Callable[[list[str]], np.ndarray] | None, max_consecutive_invalid: int):
        super().__init__(parent)
        self._batch_size = batch_size
        self._fields = dict(fields)
        self._tokenizer = tokenizer
        self._max_invalid = max_consecutive_invalid

    def __iter__(self) -> _SkipCountBatchIterator:
        return _SkipCountBatchIterator(self._parent.__iter__(), self._batch_size, self._fields, self._tokenizer,
                                       self._max_invalid)

    def __str__(self) -> str:
        return f"SkipCountBatchIterDataset(batch_size={self._batch_size}, fields={sorted(self._fields)})"


_flags_lock = threading.Lock()


def _ensure_absl_flags_parsed() -> None:
    """grain workers read absl flags; outside ``absl.app.run`` they were never parsed."""
    from absl import flags

    with _flags_lock:
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()


def _worker_init(worker_index: int, worker_count: int) -> None:
    del worker_index, worker_count
    _ensure_absl_flags_parsed()


def _resolve_fields(fields: Mapping[str, FieldSpec] | None, image_size: int) -> dict[str, FieldSpec | None]:
    """The batch declaration checked against ``image_size``; None is image + text (the text length is the
    tokenizer's, unchecked: the value None)."""
    if fields is None:
        return {IMAGE: image_field(image_size), TEXT: None}
    resolved: dict[str, FieldSpec | None] = {}
    for name, spec in fields.items():
        if not isinstance(spec, FieldSpec):
            raise ValueError(f"batch field {name!r} must be a FieldSpec, got {spec!r}")
        if name == SKIPPED:
            raise ValueError(f"{SKIPPED!r} is not a field name: every batch has it (the skipped-record count)")
        resolved[str(name)] = spec
    if not resolved:
        raise ValueError("fields is empty: a batch needs at least one field")
    if IMAGE in resolved and resolved[IMAGE] != image_field(image_size):
        raise ValueError(f"batch field 'image' declares {resolved[IMAGE]} but image_size={image_size} gives "
                         f"{image_field(image_size)}")
    text = resolved.get(TEXT)
    if text is not None and (len(text.shape) != 1 or np.dtype(text.dtype).kind not in "iu"):
        raise ValueError(f"batch field 'text' must be integer token ids of shape [length], got {text}")
    return resolved


def train_dataset_from_source(source: Any, *, tokenizer: Callable[[list[str]], np.ndarray] | None, image_size: int,
                              local_batch_size: int, seed: int, process_index: int = 0,
                              process_count: int = 1, min_crop_scale: float = 0.5, flip: bool = False,
                              num_workers: int = 0, prefetch: int = 2,
                              fields: Mapping[str, FieldSpec] | None = None,
                              side_fields: Mapping[str, str | side_fields_lib.SideFieldReader] | None = None,
                              ) -> grain.IterDataset:
    """The training ``IterDataset`` over any random-access source of ``{'image', 'caption', ...}`` records.

    ``fields`` declares the batch (None: image + text). ``side_fields`` maps extra field names to side
    files (paths or readers) keyed by the record index of the full source (``sources.full_source``); the
    declared extra fields it does not name are read from the records. ``tokenizer`` may be None when
    there is no 'text' field.
    """
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} must be in [0, {process_count})")
    resolved = _resolve_fields(fields, image_size)
    if local_batch_size <= 0 or (IMAGE in resolved and image_size <= 0):
        raise ValueError("local_batch_size and image_size must be positive")
    if TEXT in resolved and tokenizer is None:
        raise ValueError("the batch has a 'text' field, so a tokenizer is needed")
    extras = extra_fields(resolved)
    num_records = len(sources_lib.full_source(source))
    side_readers = {}
    for name, path in (side_fields or {}).items():
        if path in (None, ""):
            continue
        if name not in extras:
            logging.info("side field %r (%s) is not a batch field here; not read", name, path)
            continue
        reader = side_fields_lib.open_side_field(path, name, num_records)
        side_fields_lib.check_spec(reader, name, extras[name])
        side_readers[name] = reader
    image_transform = transforms.TrainTransform(
        image_size=image_size, min_crop_scale=float(min_crop_scale), flip=bool(flip),
        seed=int(seed)) if IMAGE in resolved else None
    load = _LoadExample(source, seed=seed, image_transform=image_transform, need_caption=TEXT in resolved,
                        extras=extras, side_readers=side_readers)
    n_local = -(-len(source) // process_count)
    max_invalid = min(_MAX_CONSECUTIVE_INVALID, max(2 * n_local, 2 * local_batch_size))

    stream = grain.MapDataset.range(_STREAM_LENGTH)[process_index::process_count]
    examples = stream.map(load)
    read_ahead = prefetch * local_batch_size
    if num_workers > 0:
        per_worker = 1 if read_ahead else 0
        ds = examples.to_iter_dataset(grain.ReadOptions(num_threads=per_worker, prefetch_buffer_size=per_worker))
        _ensure_absl_flags_parsed()
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(
            num_workers=num_workers, per_worker_buffer_size=max(1, read_ahead // num_workers)),
            worker_init_fn=_worker_init)
    else:
        threads = min(4, os.cpu_count() or 1) if read_ahead else 0
        ds = examples.to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=read_ahead))
    ds = _SkipCountBatchIterDataset(ds, local_batch_size, resolved, tokenizer if TEXT in resolved else None,
                                    max_invalid)
    if prefetch > 0:
        ds = grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=prefetch)
    return ds


class _TrainIterator(grain.DatasetIterator):
    """Outermost iterator: delegates to the pipeline and, once closed, releases it.

    Releasing the inner iterators on ``close`` lets their finalizers run while the interpreter is
    still intact (at exit, the remaining live iterators are closed by an ``atexit`` hook).
    """

    def __init__(self, inner: grain.DatasetIterator):
        super().__init__(inner)

    def __next__(self) -> dict[str, np.ndarray]:
        self._assert_not_closed()
        return next(self._parent)

    def get_state(self) -> dict[str, Any]:
        return self._parent.get_state()

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state)

    def close(self) -> None:
        if self._closed:
            return
        super().close()
        self._parents = ()

    def __str__(self) -> str:
        return "ClusJaxTrainIterator"


_live_iterators: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _close_live_iterators() -> None:
    """Stops prefetch threads and worker processes before interpreter teardown."""
    import gc

    for it in list(_live_iterators):
        try:
            it.close()
        except Exception:  # Best effort at exit.
            pass
    gc.collect()


def create_train_iterator(data_config: ml_collections.ConfigDict | Mapping[str, Any], *,
                          tokenizer: Callable[[list[str]], np.ndarray] | None, image_size: int,
                          local_batch_size: int, seed: int, process_index: int = 0, process_count: int = 1,
                          fields: Mapping[str, FieldSpec] | None = None) -> grain.DatasetIterator:
    """Infinite, resumable iterator of this process's training batches.

    Each ``next()`` gives the declared ``fields`` batched (leading dimension B = ``local_batch_size``)
    plus ``'skipped'`` (int64). With ``fields=None``: ``{'image': uint8 [B, S, S, 3], 'text': int32 [B, L],
    'skipped'}`` with S = ``image_size`` and ``text = tokenizer(captions)``.
    """
    cfg = resolve_data_config(data_config)
    source = sources_lib.make_source(cfg)
    ds = train_dataset_from_source(
        source, tokenizer=tokenizer, image_size=image_size, local_batch_size=local_batch_size, seed=seed,
        process_index=process_index, process_count=process_count, min_crop_scale=cfg.min_crop_scale,
        flip=cfg.flip, num_workers=int(cfg.num_workers), prefetch=int(cfg.prefetch), fields=fields,
        side_fields=dict(cfg.side_fields))
    it = _TrainIterator(iter(ds))
    _live_iterators.add(it)
    return it
