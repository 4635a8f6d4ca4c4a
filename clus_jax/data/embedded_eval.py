"""Evaluation sets of the embedded dataset (``load_eval_sets``), as the trainer's evaluation reads them.

  * ``easyvqa`` zero-shot, 24 classes ("red circle", ...) on the labelled easy-VQA test images.
  * ``emoji_category`` zero-shot over the emoji categories (without "Component") on held-out-concept
    Twemoji images plus OpenMoji images.
  * ``emoji_heldout`` retrieval: held-out concepts, Twemoji style, base emoji (no skin tones).
  * ``emoji_openmoji`` retrieval: OpenMoji renders of all concepts (the held-out style).
  * ``easyvqa`` probe: labelled easy-VQA train images (a class-balanced subset) against the test images.
"""
from __future__ import annotations

import functools
import os
from typing import Any

import numpy as np

from clus_jax.data import transforms
from clus_jax.data.embedded import build_embedded_dataset, read_meta, read_split
from clus_jax.data.embedded_build import META_FILE, SPLIT_SEED
from clus_jax.data.eval_sets import ClassificationSet, ProbeSet, RetrievalSet

MAX_EVAL_IMAGES = 2000
EASYVQA_EVAL_TEMPLATES = ["a {}", "a picture of a {}", "an image of a {}"]
CATEGORY_EVAL_TEMPLATES = ["an emoji of {}", "an emoji from the category {}", "{}"]


def _images(recs: list[dict[str, Any]], image_size: int) -> np.ndarray:
    out = np.empty((len(recs), image_size, image_size, 3), np.uint8)
    for i, r in enumerate(recs):
        out[i] = transforms.center_crop(transforms.to_rgb_image(r["image"]), image_size)
    out.flags.writeable = False  # shared between callers through the cache
    return out


def _retrieval(name: str, recs: list[dict[str, Any]], image_size: int) -> RetrievalSet:
    """One image per distinct picture; every concept name is a caption of its picture."""
    unique: dict[str, int] = {}
    keep: list[dict[str, Any]] = []
    caption_to_image = []
    for r in recs:
        if r["sha1"] not in unique:
            unique[r["sha1"]] = len(keep)
            keep.append(r)
        caption_to_image.append(unique[r["sha1"]])
    return RetrievalSet(name=name, images=_images(keep, image_size), captions=[r["name"] for r in recs],
                        caption_to_image=np.asarray(caption_to_image, np.int32))


def load_eval_sets(*, image_size: int,
                   cache_dir: str | None = None) -> list[ClassificationSet | RetrievalSet | ProbeSet]:
    """Builds the dataset if needed and returns its evaluation sets, images resized and centre-cropped
    to ``image_size``: classification ``easyvqa`` and ``emoji_category``, retrieval ``emoji_heldout`` and
    ``emoji_openmoji``, probe ``easyvqa``.

    Results are cached in memory per (dataset build, image size); image arrays are read-only.
    """
    path = build_embedded_dataset(cache_dir)
    stamp = os.stat(os.path.join(path, META_FILE)).st_mtime_ns
    return list(_load_eval_sets(path, int(image_size), stamp))


@functools.lru_cache(maxsize=4)
def _load_eval_sets(path: str, image_size: int, stamp: int) -> tuple:
    del stamp  # part of the cache key only
    meta = read_meta(path)
    test = read_split(path, "easyvqa_test")
    probe = read_split(path, "easyvqa_probe")
    heldout = read_split(path, "twemoji_heldout")
    openmoji = read_split(path, "openmoji")
    test_images = _images(test, image_size)
    test_labels = np.asarray([r["label"] for r in test], np.int32)

    category_recs = list(heldout)
    room = max(MAX_EVAL_IMAGES - len(category_recs), 0)
    if len(openmoji) > room:
        pick = np.sort(np.random.default_rng(SPLIT_SEED + 2).permutation(len(openmoji))[:room])
        category_recs += [openmoji[i] for i in pick]
    else:
        category_recs += openmoji
    categories = [c.lower().replace("&", "and") for c in meta["categories"]]

    return (
        ClassificationSet(name="easyvqa", images=test_images, labels=test_labels,
                          classnames=list(meta["easyvqa_classnames"]), templates=list(EASYVQA_EVAL_TEMPLATES)),
        ClassificationSet(name="emoji_category", images=_images(category_recs, image_size),
                          labels=np.asarray([r["category"] for r in category_recs], np.int32),
                          classnames=categories, templates=list(CATEGORY_EVAL_TEMPLATES)),
        _retrieval("emoji_heldout", heldout, image_size),
        _retrieval("emoji_openmoji", openmoji, image_size),
        ProbeSet(name="easyvqa", train_images=_images(probe, image_size),
                 train_labels=np.asarray([r["label"] for r in probe], np.int32),
                 test_images=test_images, test_labels=test_labels,
                 num_classes=len(meta["easyvqa_classnames"])),
    )
