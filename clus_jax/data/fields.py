"""Batch fields: the one declaration of what a training batch holds, from which everything else follows.

A field is a per-example array with a fixed shape and dtype. ``image`` and ``text`` are the towers'
inputs; objectives may declare more (``Objective.batch_fields``, e.g. MLCD's ``cluster_labels: int32[8]``).
The pipeline's output, the dummy batch used for shapes, the batch shardings and the memory plan are all
derived from one ``dict[str, FieldSpec]`` (``clus_jax.train.experiment.batch_fields``).
"""
from __future__ import annotations

import dataclasses
from typing import Mapping

import numpy as np

IMAGE = "image"
TEXT = "text"
MODALITIES = (IMAGE, TEXT)
#: Every training batch also holds this: the records passed over while filling it (an int64 count).
SKIPPED = "skipped"


@dataclasses.dataclass(frozen=True)
class FieldSpec:
    """Per-example shape and dtype of one batch field (the batch adds a leading dimension)."""

    shape: tuple[int, ...]
    dtype: str

    def __post_init__(self):
        object.__setattr__(self, "shape", tuple(int(d) for d in self.shape))
        object.__setattr__(self, "dtype", np.dtype(self.dtype).name)

    def batched(self, batch_size: int) -> tuple[tuple[int, ...], np.dtype]:
        """(shape, dtype) of a batch of ``batch_size`` examples."""
        return (int(batch_size), *self.shape), np.dtype(self.dtype)


def image_field(image_size: int) -> FieldSpec:
    return FieldSpec((image_size, image_size, 3), "uint8")


def text_field(context_length: int) -> FieldSpec:
    return FieldSpec((context_length,), "int32")


def extra_fields(fields: Mapping[str, FieldSpec]) -> dict[str, FieldSpec]:
    """The fields other than the towers' inputs (those read from records or side files)."""
    return {name: spec for name, spec in fields.items() if name not in MODALITIES}


def zeros_batch(fields: Mapping[str, FieldSpec], batch_size: int) -> dict[str, np.ndarray]:
    """A host batch of zeros (token ids of ones, so no text is empty) with the declared shapes."""
    out = {}
    for name, spec in fields.items():
        shape, dtype = spec.batched(batch_size)
        out[name] = (np.ones if name == TEXT else np.zeros)(shape, dtype)
    return out
