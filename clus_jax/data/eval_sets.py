"""In-memory evaluation sets: what an evaluator needs, independent of where the data came from."""
from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass
class ClassificationSet:
    """Zero-shot classification: images, integer labels, class names and prompt templates ('{}' = name)."""

    name: str
    images: np.ndarray  # uint8 [N, H, W, 3]
    labels: np.ndarray  # int [N]
    classnames: list[str]
    templates: list[str]


@dataclasses.dataclass
class RetrievalSet:
    """Image<->text retrieval: each caption belongs to exactly one image (several captions may share one)."""

    name: str
    images: np.ndarray  # uint8 [N, H, W, 3]
    captions: list[str]  # M captions
    caption_to_image: np.ndarray  # int [M], index into images


@dataclasses.dataclass
class ProbeSet:
    """Linear-probe / k-NN on frozen image embeddings: a labelled train and test split."""

    name: str
    train_images: np.ndarray  # uint8 [N, H, W, 3]
    train_labels: np.ndarray  # int [N]
    test_images: np.ndarray  # uint8 [M, H, W, 3]
    test_labels: np.ndarray  # int [M]
    num_classes: int
