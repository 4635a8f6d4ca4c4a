"""Evaluation datasets from where users keep them, read record by record (never the whole set in memory).

A data reference names the dataset; ``open_eval_data(ref, ...)`` returns an ``EvalData``, a random-access view
whose record ``i`` gives an image (encoded bytes or an array, decoded later so a bad record is counted, not
fatal), an integer label (or None) and a list of captions. References:

- ``tfds:NAME:SPLIT`` — a prepared TFDS dataset (``tfds.data_source``, no TensorFlow), e.g.
  ``tfds:imagenet2012:validation``; ``data_dir`` as in TFDS. Class names from its ``ClassLabel`` feature.
- ``folder:PATH`` — an image folder laid out ``PATH/<class>/<image>`` (ImageNet style), classes in sorted order;
  class names from ``PATH/classnames.txt`` (one per line, in that order) or from the folder names (``_`` read as a
  space). Optional captions: ``<image stem>.txt`` beside an image, one caption per line. A folder without class
  sub-folders is a set of unlabelled (captioned) images.
- ``wds:DIR`` or ``wds:DIR:SPLIT`` — CLIP_benchmark's WebDataset layout: ``DIR/<split>/*.tar`` (``test`` by
  default; ``nshards.txt`` gives ``0.tar .. n-1.tar``), ``DIR/classnames.txt``,
  ``DIR/zeroshot_classification_templates.txt``; samples with an image, ``cls`` (class index as text) and/or
  ``txt`` (captions, one per line).
- ``tar:GLOB`` — WebDataset tar shards with the same sample keys, without the metadata files.
- ``synthetic:N`` — ``N`` generated coloured shapes (``data.synthetic``), labelled by colour and shape (24 classes
  named "red square", ...) and captioned; no files, for smoke tests and benchmarks.
- ``arrayrecord:GLOB`` — ArrayRecord files of msgpack maps or ``tf.train.Example``s with image, label and caption
  fields (``image_key``, ``label_key``, ``caption_key``; a caption field may hold a list or newline-separated
  captions).

Templates use ``{}`` for the class name; CLIP_benchmark's ``{c}`` is read as ``{}``.
"""
from __future__ import annotations

import dataclasses
import glob
import os
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from clus_jax.data import records as records_lib
from clus_jax.data import sources

KINDS = ("tfds", "folder", "wds", "tar", "arrayrecord", "synthetic")
IMAGE_FILE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")
CLASSNAMES_FILE = "classnames.txt"
TEMPLATES_FILE = "zeroshot_classification_templates.txt"


def read_lines(path: str) -> list[str]:
    """The non-empty lines of a text file, stripped (class names, templates, captions)."""
    with open(os.path.expanduser(path), encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip()]


def normalize_template(template: str) -> str:
    """A prompt template with ``{}`` for the class name (CLIP_benchmark writes ``{c}``)."""
    return template.replace("{c}", "{}")


def _text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, (bytes, bytearray, memoryview, np.bytes_)):
        return bytes(value).decode("utf-8", "replace")
    if isinstance(value, np.ndarray) and value.ndim == 0:
        return _text(value.item())
    return str(value)


def _captions(value: Any) -> list[str]:
    """Captions from a field: a string of lines, bytes, a list, or a TFDS nested ``{'text': [...]}``."""
    if value is None:
        return []
    if isinstance(value, dict):
        return _captions(value.get("text", value.get("caption")))
    if isinstance(value, (list, tuple)) or (isinstance(value, np.ndarray) and value.ndim > 0):
        return [c for v in value for c in _captions(v)]
    text = _text(value)
    return [line.strip() for line in (text or "").splitlines() if line.strip()]


def _label(value: Any) -> int | None:
    """A class index from an int, a one-element list, or text (``cls`` members hold '7')."""
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        return _label(value[0]) if value else None
    if isinstance(value, (bytes, bytearray, memoryview, np.bytes_, str)):
        text = _text(value).strip()
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"label {text!r} is not an integer class index") from None
    return int(value)


@dataclasses.dataclass
class EvalData:
    """A random-access evaluation dataset: ``len``, ``record(i) -> {'image', 'label', 'captions'}``.

    ``classnames`` / ``templates``: what the data itself says (None when it says nothing); an evaluator's
    settings may override them. ``ref``: the reference it was opened from (the result files' ``dataset``).
    """

    ref: str
    source: Any
    label_key: str | None = "label"
    caption_key: str | None = "caption"
    classnames: list[str] | None = None
    templates: list[str] | None = None
    limit: int | None = None

    def __len__(self) -> int:
        n = len(self.source)
        return n if self.limit is None else min(n, int(self.limit))

    def record(self, index: int) -> dict[str, Any]:
        """Record ``index``: ``image`` (bytes or array, undecoded), ``label`` (int or None), ``captions``."""
        raw = self.source[int(index)]
        return {"image": raw.get("image"),
                "label": _label(raw.get(self.label_key)) if self.label_key else None,
                "captions": _captions(raw.get(self.caption_key)) if self.caption_key else []}

    def label(self, index: int) -> int | None:
        """Record ``index``'s label, without reading its image where the source can (an image folder)."""
        if not self.label_key:
            return None
        if hasattr(self.source, "label_of"):
            return self.source.label_of(int(index))
        return self.record(index)["label"]

    def captions(self, index: int) -> list[str]:
        return self.record(index)["captions"]


class FolderSource:
    """An image folder (``folder:`` reference): records ``{'image': bytes, 'label', 'caption'}``, files read on
    access, so the folder is listed once and never loaded."""

    def __init__(self, root: str):
        self.root = os.path.expanduser(root)
        if not os.path.isdir(self.root):
            raise FileNotFoundError(f"image folder {root!r} does not exist")
        classes = sorted(d for d in os.listdir(self.root) if os.path.isdir(os.path.join(self.root, d)))
        self.classes = classes
        files: list[tuple[str, int | None]] = []
        for label, name in enumerate(classes) if classes else [(None, "")]:
            folder = os.path.join(self.root, name)
            files += [(os.path.join(folder, f), label) for f in sorted(os.listdir(folder))
                      if f.lower().endswith(IMAGE_FILE_EXTENSIONS)]
        if not files:
            raise FileNotFoundError(f"image folder {root!r} holds no images ({', '.join(IMAGE_FILE_EXTENSIONS)})")
        self.files = files

    def __len__(self) -> int:
        return len(self.files)

    def __repr__(self) -> str:
        return f"FolderSource({self.root!r}, images={len(self.files)}, classes={len(self.classes)})"

    def label_of(self, index: int) -> int | None:
        return self.files[int(index)][1]

    def __getitem__(self, index: int) -> dict[str, Any]:
        path, label = self.files[int(index)]
        with open(path, "rb") as f:
            image = f.read()
        caption_file = os.path.splitext(path)[0] + ".txt"
        caption = None
        if os.path.isfile(caption_file):
            with open(caption_file, encoding="utf-8") as f:
                caption = f.read()
        return {"image": image, "label": label, "caption": caption}


def _optional_lines(path: str) -> list[str] | None:
    return read_lines(path) if os.path.isfile(path) else None


def _wds_shards(root: str, split: str) -> list[str]:
    folder = os.path.join(root, split)
    count = os.path.join(folder, "nshards.txt")
    if os.path.isfile(count):
        return [os.path.join(folder, f"{i}.tar") for i in range(int(read_lines(count)[0]))]
    shards = sorted(glob.glob(os.path.join(folder, "*.tar")))
    if not shards:
        raise FileNotFoundError(f"no tar shards in {folder!r} (CLIP_benchmark layout: DIR/<split>/0.tar ...)")
    return shards


def parse_ref(ref: str) -> tuple[str, str, str | None]:
    """``'kind:path[:split]'`` -> (kind, path, split); ValueError naming the kinds for anything else."""
    kind, sep, rest = str(ref).partition(":")
    if not sep or kind not in KINDS or not rest:
        raise ValueError(f"data reference {ref!r} must be KIND:PATH with KIND one of {list(KINDS)} "
                         "(e.g. 'tfds:cifar10:test', 'folder:/data/imagenet/val', 'wds:/data/wds_mnist')")
    if kind in ("tfds", "wds"):
        # the split is after the last ':' outside a slice: 'imagenet2012:validation[:1000]'
        m = re.fullmatch(r"(.*):([^:\[\]]+(?:\[.*\])?)", rest)
        if m:
            return kind, m.group(1), m.group(2)
    return kind, rest, None


def check_ref(ref: str, *, data_dir: str | None = None) -> None:
    """Checks, cheaply and before any run, that ``ref`` is well formed and its files exist (no shard is indexed,
    no record read): ValueError or FileNotFoundError naming the reference."""
    kind, path, split = parse_ref(ref)
    where = os.path.expanduser(path)
    if kind == "synthetic":
        if not path.isdigit() or int(path) < 1:
            raise ValueError(f"data reference {ref!r}: synthetic:N needs a positive number of images")
    elif kind == "folder" and not os.path.isdir(where):
        raise FileNotFoundError(f"data reference {ref!r}: no folder {path!r}")
    elif kind == "wds" and not os.path.isdir(os.path.join(where, split or "test")):
        raise FileNotFoundError(f"data reference {ref!r}: no folder {os.path.join(path, split or 'test')!r} "
                                "(CLIP_benchmark layout: DIR/<split>/0.tar ...)")
    elif kind in ("tar", "arrayrecord"):
        records_lib.expand_paths(path, what=f"{ref!r}")
    elif kind == "tfds" and data_dir and not os.path.isdir(os.path.expanduser(data_dir)):
        raise FileNotFoundError(f"data reference {ref!r}: TFDS data_dir {data_dir!r} does not exist")


def open_eval_data(ref: str, *, data_dir: str | None = None, image_key: str | None = None,
                   label_key: str | None = None, caption_key: str | None = None,
                   limit: int | None = None) -> EvalData:
    """Opens the dataset ``ref`` names (module docstring). Keys default to each format's own names
    (``image``/``label``/``caption``; TFDS ``captions`` when the dataset has it). ``limit``: the first records only."""
    kind, path, split = parse_ref(ref)
    if limit is not None and int(limit) < 1:
        raise ValueError(f"limit={limit!r} must be at least 1")
    common = dict(ref=ref, limit=None if limit is None else int(limit))
    if kind == "folder":
        source = FolderSource(path)
        names = _optional_lines(os.path.join(source.root, CLASSNAMES_FILE))
        if names is not None and len(names) != len(source.classes):
            raise ValueError(f"{os.path.join(path, CLASSNAMES_FILE)!r} has {len(names)} names for "
                             f"{len(source.classes)} class folders")
        return EvalData(source=source, label_key="label" if source.classes else None, caption_key="caption",
                        classnames=names or [c.replace("_", " ") for c in source.classes] or None,
                        templates=_optional_lines(os.path.join(source.root, TEMPLATES_FILE)), **common)
    if kind in ("wds", "tar"):
        label = label_key or "cls"
        shards = _wds_shards(os.path.expanduser(path), split or "test") if kind == "wds" else path
        source = sources.TarShardSource(shards, image_key=image_key, caption_key=caption_key or "txt",
                                        extra_keys=(label,))
        root = os.path.expanduser(path)
        meta = (lambda f: _optional_lines(os.path.join(root, f))) if kind == "wds" else (lambda f: None)
        return EvalData(source=source, label_key=label, caption_key="caption", classnames=meta(CLASSNAMES_FILE),
                        templates=meta(TEMPLATES_FILE), **common)
    if kind == "synthetic":
        from clus_jax.data import synthetic

        try:
            size = int(path)
        except ValueError:
            raise ValueError(f"data reference {ref!r}: synthetic:N needs a number of images") from None
        names = [f"{color} {shape}" for color in synthetic.COLORS for shape in synthetic.SHAPES]
        return EvalData(source=synthetic.SyntheticSource(size), label_key="label", caption_key="caption",
                        classnames=names, **common)
    if kind == "arrayrecord":
        source = sources.ArrayRecordSource(path, image_key=image_key or "image", caption_key=caption_key or "caption")
        return EvalData(source=source, label_key=label_key or "label", caption_key="caption", **common)
    source = sources.TfdsSource(path, split=split or "test", data_dir=data_dir, image_key=image_key or "image",
                                caption_key=caption_key or "captions")
    label = label_key or "label"
    return EvalData(source=source, label_key=label, caption_key="caption", classnames=_tfds_classnames(source, label),
                    **common)


def _tfds_classnames(source: sources.TfdsSource, label_key: str) -> list[str] | None:
    """The names of a TFDS ``ClassLabel`` feature (None when the dataset has no such feature)."""
    info = getattr(source._get(), "dataset_info", None)
    features = getattr(info, "features", None)
    feature = features[label_key] if features is not None and label_key in features.keys() else None
    names = getattr(feature, "names", None)
    return [n.replace("_", " ") for n in names] if names else None


def check_templates(templates: Sequence[str], what: str) -> list[str]:
    """Templates normalised to ``{}``, each checked to hold one; ValueError naming ``what`` otherwise."""
    out = [normalize_template(t) for t in templates]
    bad = [t for t in out if "{}" not in t]
    if bad or not out:
        raise ValueError(f"{what}: every template needs a '{{}}' (or '{{c}}') for the class name; got {bad or 'none'}")
    return out
