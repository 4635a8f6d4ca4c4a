"""Training input pipeline on grain: global shuffle, process sharding, decode + augment, skip-and-count,
batching and tokenization, with exactly resumable iterator state.

``data_config`` keys (``default_data_config()`` gives all of them; unknown keys are an error):
  source          'embedded' (default; built at first use, see ``embedded.py``), 'synthetic',
                  'array_record', 'tfds' or 'tar'.
  path            array_record: glob (or comma-separated globs) of ArrayRecord files; tar: glob of
                  uncompressed WebDataset tar shards; tfds: the dataset name. Unused otherwise.
  split           tfds split (default 'train').
  tfds_data_dir   tfds data_dir (None: TFDS's default).
  image_key       record field (array_record, tfds; default 'image') or member extension (tar;
                  default: first of jpg/jpeg/png/webp) holding the image.
  caption_key     record field (default 'caption') or member extension (tar; default: first of
                  txt/caption/json) holding the caption.
  cache_dir       where the embedded dataset is built (None: $CLUS_JAX_CACHE or ~/.cache/clus_jax).
  num_workers     0: decode in this process (with a few threads); >0: grain worker processes
                  (``mp_prefetch``). Worker processes are spawned, so the entry point needs an
                  ``if __name__ == '__main__':`` guard; absl flags are marked parsed here if needed.
  prefetch        batches prepared ahead in a background thread (0: none); the per-example
                  read-ahead is ``prefetch * local_batch_size`` examples.
  min_crop_scale  lower bound of the random-resized-crop area fraction (upper bound 1).
  flip            random horizontal flips (off by default: emoji names say "facing right").
  synthetic_size  number of examples of the synthetic source.

Order of operations. The global example stream is g = 0, 1, 2, ... (infinite): epoch ``g // N``,
record ``shuffle_epoch(g % N)`` where every epoch has its own seeded permutation of the N records.
Process p of n takes g = p, p + n, p + 2n, ..., so one step's local batches of all processes form one
global batch without overlap (as long as no record is skipped). Each example is decoded and augmented
with randomness drawn from (seed, epoch, record index); invalid records (undecodable image, empty or
non-UTF-8 caption, unparsable record) are dropped while filling a batch and counted in ``'skipped'``.
The iterator state is the position in the stream, so ``set_state(get_state())`` reproduces exactly the
batches an uninterrupted run would see next, with or without worker processes (the batches do not
depend on ``num_workers``). A saved state restores into an iterator built with the same source, seed,
batch size, process count and ``num_workers``.
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

from clus_jax.data import sources as sources_lib
from clus_jax.data import transforms

SOURCES = ("embedded", "synthetic", "array_record", "tfds", "tar")
_STREAM_LENGTH = 2**62
_MAX_CONSECUTIVE_INVALID = 10_000


def default_data_config() -> ml_collections.ConfigDict:
    """All data config keys, with defaults suited to the embedded dataset.

    Optional strings are typed references, so ``--config.data.path=...`` works from the command line.
    """
    optional_str = lambda: ml_collections.FieldReference(None, field_type=str)  # noqa: E731
    return ml_collections.ConfigDict({
        "source": "embedded",
        "path": optional_str(),
        "split": "train",
        "tfds_data_dir": optional_str(),
        "image_key": optional_str(),
        "caption_key": optional_str(),
        "cache_dir": optional_str(),
        "num_workers": 0,
        "prefetch": 2,
        "min_crop_scale": 0.5,
        "flip": False,
        "synthetic_size": 10_000,
    })


def resolve_data_config(
        data_config: ml_collections.ConfigDict | Mapping[str, Any] | None) -> ml_collections.ConfigDict:
    """Defaults overridden by ``data_config``; rejects unknown keys and invalid values."""
    merged = default_data_config().to_dict()
    given = {} if data_config is None else (
        data_config.to_dict() if hasattr(data_config, "to_dict") else dict(data_config))
    unknown = sorted(set(given) - set(merged))
    if unknown:
        raise ValueError(f"unknown data config keys {unknown}; known keys: {sorted(merged)}")
    merged.update(given)
    if merged["source"] not in SOURCES:
        raise ValueError(f"data source must be one of {SOURCES}, got {merged['source']!r}")
    if int(merged["num_workers"]) < 0 or int(merged["prefetch"]) < 0:
        raise ValueError("num_workers and prefetch must be >= 0")
    if not 0.0 < float(merged["min_crop_scale"]) <= 1.0:
        raise ValueError(f"min_crop_scale must be in (0, 1], got {merged['min_crop_scale']}")
    return ml_collections.ConfigDict(merged)


def _epoch_seed(seed: int, epoch: int) -> int:
    return int(np.random.SeedSequence([seed & ((1 << 64) - 1), epoch]).generate_state(1, np.uint32)[0])


def shuffled_record_index(position: int, num_records: int, seed: int) -> tuple[int, int]:
    """(epoch, record index) read at global stream ``position``: each epoch is a seeded permutation."""
    epoch, pos = divmod(int(position), num_records)
    if num_records == 1:
        return epoch, 0
    return epoch, int(grain.experimental.index_shuffle(pos, max_index=num_records - 1,
                                                       seed=_epoch_seed(seed, epoch), rounds=4))


class _LoadExample:
    """Maps a global stream position to a transformed example (picklable, for worker processes)."""

    def __init__(self, source: Any, transform: Callable[..., dict[str, Any]], seed: int):
        self._source = source
        self._n = len(source)
        if self._n <= 0:
            raise ValueError(f"data source {source!r} is empty")
        if self._n > 2**32:
            raise ValueError("data sources larger than 2**32 records are not supported")
        self._transform = transform
        self._seed = int(seed)
        self._warned = False

    def __call__(self, position: int) -> dict[str, Any]:
        epoch, index = shuffled_record_index(position, self._n, self._seed)
        try:
            record = self._source[index]
        except Exception as e:  # A corrupt record must not stop training; it is counted as skipped.
            if not self._warned:
                logging.warning("skipping unreadable record %d of %r: %s: %s", index, self._source,
                                type(e).__name__, e)
                self._warned = True
            record = None
        return self._transform(record, epoch=epoch, index=index)


class _SkipCountBatchIterator(grain.DatasetIterator):
    """Fills each batch with valid examples only, counting the invalid ones it passes over."""

    def __init__(self, parent: grain.DatasetIterator, batch_size: int,
                 tokenizer: Callable[[list[str]], np.ndarray], max_consecutive_invalid: int):
        super().__init__(parent)
        self._batch_size = batch_size
        self._tokenizer = tokenizer
        self._max_invalid = max_consecutive_invalid
        self._consecutive_invalid = 0

    def __next__(self) -> dict[str, np.ndarray]:
        images, captions, skipped = [], [], 0
        while len(images) < self._batch_size:
            ex = next(self._parent)
            if not ex["valid"]:
                skipped += 1
                self._consecutive_invalid += 1
                if self._consecutive_invalid >= self._max_invalid:
                    raise RuntimeError(
                        f"{self._consecutive_invalid} consecutive records could not be used (undecodable "
                        "image or missing caption); check data_config.path, image_key and caption_key")
                continue
            self._consecutive_invalid = 0
            images.append(ex["image"])
            captions.append(ex["caption"])
        text = np.asarray(self._tokenizer(captions))
        if text.ndim != 2 or text.shape[0] != self._batch_size:
            raise ValueError(f"tokenizer must return [batch, length] ids, got shape {text.shape}")
        return {"image": np.stack(images).astype(np.uint8, copy=False),
                "text": text.astype(np.int32, copy=False),
                "skipped": np.int64(skipped)}

    def get_state(self) -> dict[str, Any]:
        return self._parent.get_state()

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state)
        self._consecutive_invalid = 0

    def __str__(self) -> str:
        return f"SkipCountBatchIterator(batch_size={self._batch_size})"


class _SkipCountBatchIterDataset(grain.IterDataset):
    def __init__(self, parent: grain.IterDataset, batch_size: int,
                 tokenizer: Callable[[list[str]], np.ndarray], max_consecutive_invalid: int):
        super().__init__(parent)
        self._batch_size = batch_size
        self._tokenizer = tokenizer
        self._max_invalid = max_consecutive_invalid

    def __iter__(self) -> _SkipCountBatchIterator:
        return _SkipCountBatchIterator(self._parent.__iter__(), self._batch_size, self._tokenizer,
                                       self._max_invalid)

    def __str__(self) -> str:
        return f"SkipCountBatchIterDataset(batch_size={self._batch_size})"


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


def train_dataset_from_source(source: Any, *, tokenizer: Callable[[list[str]], np.ndarray], image_size: int,
                              local_batch_size: int, seed: int, process_index: int = 0,
                              process_count: int = 1, min_crop_scale: float = 0.5, flip: bool = False,
                              num_workers: int = 0, prefetch: int = 2) -> grain.IterDataset:
    """The training ``IterDataset`` over any random-access source of ``{'image', 'caption'}`` records."""
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} must be in [0, {process_count})")
    if local_batch_size <= 0 or image_size <= 0:
        raise ValueError("local_batch_size and image_size must be positive")
    transform = transforms.TrainTransform(image_size=image_size, min_crop_scale=float(min_crop_scale),
                                          flip=bool(flip), seed=int(seed))
    load = _LoadExample(source, transform, seed)
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
    ds = _SkipCountBatchIterDataset(ds, local_batch_size, tokenizer, max_invalid)
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


def create_train_iterator(data_config: ml_collections.ConfigDict, *, tokenizer: Callable[[list[str]], np.ndarray],
                          image_size: int, local_batch_size: int, seed: int,
                          process_index: int = 0, process_count: int = 1) -> grain.DatasetIterator:
    """Infinite, resumable iterator of this process's training batches.

    Each ``next()`` gives ``{'image': uint8 [B, S, S, 3], 'text': int32 [B, L], 'skipped': int64}`` with
    B = ``local_batch_size`` and S = ``image_size``; ``text = tokenizer(captions)``.
    """
    cfg = resolve_data_config(data_config)
    source = sources_lib.make_source(cfg)
    ds = train_dataset_from_source(
        source, tokenizer=tokenizer, image_size=image_size, local_batch_size=local_batch_size, seed=seed,
        process_index=process_index, process_count=process_count, min_crop_scale=cfg.min_crop_scale,
        flip=cfg.flip, num_workers=int(cfg.num_workers), prefetch=int(cfg.prefetch))
    it = _TrainIterator(iter(ds))
    _live_iterators.add(it)
    return it
