"""Streams an evaluation dataset through the image encoder in global batches, sharded over processes.

Batch ``b`` holds records ``indices[b*B:(b+1)*B]`` (B = ``EvalContext.batch_size``, a multiple of the processes
and data-parallel devices), the last one padded with masked rows. Each process reads and decodes only its own
rows (``multihost.process_slice``), so the set is never whole in any host's memory; the row encoder gathers the
batch's embeddings, validity and labels, and every process sees the same batches in the same order. Figures
are therefore the same for any number of devices and processes and any batch size.

A record that cannot be read or decoded is counted (``Streamed.failed``), left out of every figure, and reported
by the evaluators as ``<kind>/<entry>/decode_errors``; it is never silently dropped.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import time
from collections.abc import Callable, Iterator

import numpy as np
from absl import logging

from clus_jax.data import transforms
from clus_jax.data.eval_data import EvalData
from clus_jax.evaluate import metrics
from clus_jax.parallel import multihost

#: Threads decoding one process's rows (PIL releases the GIL while decoding).
DECODE_THREADS = min(8, os.cpu_count() or 1)


@dataclasses.dataclass
class Streamed:
    """What streaming a set gives: the kept rows' embeddings, labels and record indices, in record order."""

    embeddings: np.ndarray  # float32 [n, D], L2-normalised (empty [0, 0] when the caller kept none)
    labels: np.ndarray  # int64 [n], -1 for an unlabelled record
    indices: np.ndarray  # int64 [n], record index of each row
    failed: int  # records that could not be read or decoded
    seconds: float
    images: int  # records streamed (failed ones included)

    @property
    def images_per_second(self) -> float:
        return self.images / max(self.seconds, 1e-9)


def _decode(data: EvalData, index: int, image_size: int) -> tuple[np.ndarray | None, int]:
    """(uint8 [S, S, 3] or None when the record is unreadable, label or -1)."""
    try:
        record = data.record(index)
        image = transforms.center_crop(transforms.to_rgb_image(record["image"], min_size=image_size), image_size)
    except (transforms.InvalidRecord, ValueError, OSError, KeyError, TypeError) as e:
        logging.warning("eval data %s: record %d skipped: %s", data.ref, index, e)
        return None, -1
    label = record["label"]
    return image, -1 if label is None else int(label)


def _local_batch(data: EvalData, rows: np.ndarray, image_size: int,
                 pool: concurrent.futures.Executor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """This process's rows of one global batch: images, valid, labels (padding rows: blank and invalid)."""
    images = np.zeros((len(rows), image_size, image_size, 3), np.uint8)
    valid = np.zeros(len(rows), bool)
    labels = np.full(len(rows), -1, np.int32)
    decoded = pool.map(lambda i: _decode(data, int(i), image_size) if i >= 0 else (None, -1), rows)
    for j, (image, label) in enumerate(decoded):
        if image is not None:
            images[j], valid[j], labels[j] = image, True, label
    return images, valid, labels


def batches(indices: np.ndarray, batch_size: int) -> Iterator[np.ndarray]:
    """The global batches of ``indices``, the last one padded with -1 (masked) rows."""
    for start in range(0, len(indices), batch_size):
        rows = indices[start:start + batch_size]
        yield np.concatenate([rows, np.full(batch_size - len(rows), -1, rows.dtype)])


def stream_images(data: EvalData, row_encoder: Callable, batch_size: int, image_size: int, *,
                  indices: np.ndarray | None = None, keep: bool = True,
                  on_batch: Callable[[np.ndarray, np.ndarray], None] | None = None) -> Streamed:
    """Embeds the records ``indices`` (default: all of ``data``) in global batches of ``batch_size``.

    ``row_encoder``: ``EvalContext.row_encoder()``. Embeddings are L2-normalised again here, as ``runner`` does.
    ``on_batch(embeddings, labels)`` sees each batch's decoded rows
    (a streamed metric accumulates there); ``keep=False`` keeps no embedding, so host memory stays flat in the
    set's size.
    """
    indices = np.arange(len(data), dtype=np.int64) if indices is None else np.asarray(indices, np.int64)
    mine = multihost.process_slice(batch_size)
    kept: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    failed = 0
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(max(DECODE_THREADS, 1)) as pool, \
            concurrent.futures.ThreadPoolExecutor(1) as ahead:
        todo = list(batches(indices, batch_size))
        nxt = ahead.submit(_local_batch, data, todo[0][mine], image_size, pool) if todo else None
        for b, rows in enumerate(todo):
            images, valid, labels = nxt.result()
            if b + 1 < len(todo):  # decoding the next batch overlaps with encoding this one
                nxt = ahead.submit(_local_batch, data, todo[b + 1][mine], image_size, pool)
            emb, valid, labels = row_encoder(images, valid, labels)
            valid = np.asarray(valid, bool)
            failed += int(((rows >= 0) & ~valid).sum())
            emb = metrics.l2_normalize(np.asarray(emb, np.float32)[valid])
            got = np.asarray(labels, np.int64)[valid]
            if on_batch is not None:
                on_batch(emb, got)
            if keep:
                kept.append((emb, got, rows[valid]))
    seconds = time.perf_counter() - start
    if kept:
        emb, labels, idx = (np.concatenate(parts) for parts in zip(*kept))
    else:
        emb, labels, idx = np.zeros((0, 0), np.float32), np.zeros(0, np.int64), np.zeros(0, np.int64)
    return Streamed(embeddings=emb, labels=labels, indices=idx, failed=failed, seconds=seconds, images=len(indices))
