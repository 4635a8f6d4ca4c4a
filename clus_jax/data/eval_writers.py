"""A small labelled and/or captioned image set written in every layout ``eval_data.open_eval_data`` reads:
an image folder, CLIP_benchmark's WebDataset, an ArrayRecord file and a local TFDS dataset.

For stand-ins of real benchmarks (a few images under the real layout and name) and the tests. Images are uint8
``[N, H, W]`` (grey) or ``[N, H, W, 3]``, written as PNG, so they read back to the same pixels; labels int
``[N]`` or None; captions a list (one per image) of lists of strings, or None; class names and templates lists
or None. Every file is written beside its name and renamed into place.
"""
from __future__ import annotations

import io
import os
import tarfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image

from clus_jax.common.files import atomic_path, atomic_write_bytes
from clus_jax.data import records
from clus_jax.data.eval_data import CLASSNAMES_FILE, TEMPLATES_FILE, normalize_template

TFDS_VERSION = "1.0.0"


def png_bytes(image: np.ndarray, channels: int | None = None) -> bytes:
    """A uint8 ``[H, W]`` or ``[H, W, 3]`` image as PNG (grey or RGB; ``channels=3`` makes a grey one RGB)."""
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    if channels == 3 and image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=-1)
    buf = io.BytesIO()
    Image.fromarray(image, "L" if image.ndim == 2 else "RGB").save(buf, "PNG")
    return buf.getvalue()


def _lines(values: Sequence[str] | None, what: str) -> list[str] | None:
    """Entries written one per line: each a non-empty single line without surrounding spaces."""
    if values is None:
        return None
    out = [str(v) for v in values]
    bad = [v for v in out if not v.strip() or v != v.strip() or "\n" in v or "\r" in v]
    if bad:
        raise ValueError(f"{what}: each entry must be one non-empty line without surrounding spaces; got {bad[:3]}")
    return out


def _check(images: np.ndarray, labels: Sequence[int] | np.ndarray | None, captions: Sequence[Sequence[str]] | None,
           classnames: Sequence[str] | None) -> tuple[np.ndarray, np.ndarray | None, list[list[str]] | None, int]:
    """Images, labels, captions and the class count, checked to agree (ValueError naming what does not)."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[-1] != 3):
        raise ValueError(f"images must be uint8 [N, H, W] or [N, H, W, 3]; got {images.dtype} {images.shape}")
    n = len(images)
    if labels is not None:
        labels = np.asarray(labels)
        if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer) or (n and labels.min() < 0):
            raise ValueError(f"labels must be {n} non-negative integers; got {labels.dtype} {labels.shape}")
        labels = labels.astype(np.int64)
    if captions is not None:
        if len(captions) != n:
            raise ValueError(f"captions: {len(captions)} lists for {n} images")
        captions = [_lines(c, f"captions of image {i}") for i, c in enumerate(captions)]
    num_classes = len(classnames) if classnames is not None else 0
    if labels is not None and n:
        if classnames is not None and labels.max() >= num_classes:
            raise ValueError(f"label {int(labels.max())} but only {num_classes} class names")
        num_classes = max(num_classes, int(labels.max()) + 1)
    return images, labels, captions, num_classes


def _empty_folder(path: str) -> str:
    """Creates ``path``; refuses one that holds files already (they would mix with the set written)."""
    if os.path.isdir(path) and os.listdir(path):
        raise FileExistsError(f"{path!r} is not empty; write the set into a new or empty folder")
    os.makedirs(path, exist_ok=True)
    return path


def write_image_folder(root: str | os.PathLike, images: np.ndarray, labels: Sequence[int] | None = None,
                       classnames: Sequence[str] | None = None, captions: Sequence[Sequence[str]] | None = None,
                       templates: Sequence[str] | None = None) -> str:
    """An image folder (``folder:ROOT``): ``ROOT/c<label:05d>/<index:06d>.png``, one folder per class (empty
    ones too) so that sorted folders are the class order; ``classnames.txt`` with the names; ``<stem>.txt``
    beside an image with its captions, one per line; ``zeroshot_classification_templates.txt``. Without labels
    the images lie in ``ROOT`` itself. A folder is read class by class, so records come back sorted by label.
    ``ROOT`` must be new or empty (FileExistsError)."""
    images, labels, captions, num_classes = _check(images, labels, captions, classnames)
    root = _empty_folder(os.fspath(root))
    folders = [f"c{c:05d}" for c in range(num_classes)] if labels is not None else [""]
    for folder in folders:
        os.makedirs(os.path.join(root, folder), exist_ok=True)
    for i, image in enumerate(images):
        stem = os.path.join(root, folders[labels[i]] if labels is not None else "", f"{i:06d}")
        atomic_write_bytes(stem + ".png", png_bytes(image))
        if captions is not None:
            atomic_write_bytes(stem + ".txt", "".join(c + "\n" for c in captions[i]).encode())
    _write_lines(os.path.join(root, CLASSNAMES_FILE), _lines(classnames, "classnames"))
    _write_lines(os.path.join(root, TEMPLATES_FILE), _lines(templates, "templates"))
    return root


def _write_lines(path: str, lines: list[str] | None) -> None:
    if lines is not None:
        atomic_write_bytes(path, "".join(line + "\n" for line in lines).encode())


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), int(time.time()), 0o644
    tar.addfile(info, io.BytesIO(data))


def write_wds(root: str | os.PathLike, images: np.ndarray, labels: Sequence[int] | None = None,
              captions: Sequence[Sequence[str]] | None = None, classnames: Sequence[str] | None = None,
              templates: Sequence[str] | None = None, split: str = "test", shard_size: int = 1000) -> str:
    """CLIP_benchmark's WebDataset layout (``wds:ROOT[:SPLIT]``): ``ROOT/<split>/0.tar .. n-1.tar`` of samples
    ``s<index:07d>.png`` / ``.cls`` (the label as text) / ``.txt`` (captions, one per line),
    ``ROOT/<split>/nshards.txt``, ``ROOT/classnames.txt``, ``ROOT/zeroshot_classification_templates.txt``
    (CLIP_benchmark's ``{c}`` form) and ``ROOT/dataset_type.txt`` (``retrieval`` for captions without labels,
    else ``classification``). ``ROOT/<split>`` must be new or empty (FileExistsError)."""
    images, labels, captions, _ = _check(images, labels, captions, classnames)
    if shard_size < 1:
        raise ValueError(f"shard_size={shard_size} must be at least 1")
    root = os.fspath(root)
    folder = _empty_folder(os.path.join(root, split))
    starts = range(0, max(len(images), 1), shard_size)
    for shard, start in enumerate(starts):
        with atomic_path(os.path.join(folder, f"{shard}.tar")) as tmp, tarfile.open(os.fspath(tmp), "w") as tar:
            for i in range(start, min(start + shard_size, len(images))):
                _add_member(tar, f"s{i:07d}.png", png_bytes(images[i]))
                if labels is not None:
                    _add_member(tar, f"s{i:07d}.cls", str(int(labels[i])).encode())
                if captions is not None:
                    _add_member(tar, f"s{i:07d}.txt", "\n".join(captions[i]).encode())
    _write_lines(os.path.join(folder, "nshards.txt"), [str(len(starts))])
    _write_lines(os.path.join(root, CLASSNAMES_FILE), _lines(classnames, "classnames"))
    curly = None if templates is None else [normalize_template(t).replace("{}", "{c}") for t in templates]
    _write_lines(os.path.join(root, TEMPLATES_FILE), _lines(curly, "templates"))
    retrieval = captions is not None and labels is None
    _write_lines(os.path.join(root, "dataset_type.txt"), ["retrieval" if retrieval else "classification"])
    return root


def write_array_records(path: str | os.PathLike, images: np.ndarray, labels: Sequence[int] | None = None,
                        captions: Sequence[Sequence[str]] | None = None) -> str:
    """One ArrayRecord file (``arrayrecord:PATH``) of msgpack records ``{'image': PNG bytes, 'label': int,
    'caption': captions joined by newlines}`` (keys present when given)."""
    images, labels, captions, _ = _check(images, labels, captions, None)

    def rows() -> Iterable[dict[str, Any]]:
        for i, image in enumerate(images):
            row: dict[str, Any] = {"image": png_bytes(image)}
            if labels is not None:
                row["label"] = int(labels[i])
            if captions is not None:
                row["caption"] = "\n".join(captions[i])
            yield row

    records.write_array_record(os.fspath(path), rows())
    return os.fspath(path)


# ---------------------------------------------------------------------------------------------------- TFDS


def _import_tfds():
    import tensorflow_datasets as tfds  # optional dependency (the test extra); no TensorFlow needed

    return tfds


def registered_tfds_builder(name: str) -> type | None:
    """The builder class TFDS registers under ``name`` (e.g. ``imagenet2012``, or ``imagenet_v2/matched-frequency``:
    a name with its configuration), else None."""
    tfds = _import_tfds()
    try:
        return tfds.builder_cls(name.split("/")[0])
    except tfds.core.registered.DatasetNotFoundError:
        return None


def write_tfds_examples(data_dir: str | os.PathLike, name: str,
                        examples: Iterable[Mapping[str, Any]] | Callable[[Any], Iterable[Mapping[str, Any]]],
                        features: Any = None, split: str = "test") -> Any:
    """A local TFDS dataset ``name`` (ArrayRecord files, no TensorFlow) holding ``examples`` as ``split``, readable
    with ``tfds.data_source(name, split=split, data_dir=data_dir)``. Returns the prepared builder.

    One split per dataset, written once (FileExistsError when ``data_dir`` holds the dataset already).
    ``features``: a ``tfds.features.FeaturesDict`` for a new name (version 1.0.0). For a name TFDS registers,
    leave it None: ``tfds.data_source`` then reads the data with the registered builder's own code, so the
    examples must have its features, version and configuration; the files are written by a subclass of it that
    only replaces where the examples come from. ``examples`` may be a function of the builder's features; they
    are all made (in memory: small sets) before anything is written, so a bad one leaves nothing behind.
    """
    tfds = _import_tfds()
    base = registered_tfds_builder(name)
    if (base is None) == (features is None):
        raise ValueError(f"TFDS dataset {name!r}: " + ("give its features" if base is None else
                         "TFDS registers this name, so its own features are used; give no features"))

    def _split_generators(self, dl_manager):
        return {split: self._generate_examples()}

    rows: list[dict[str, Any]] = []  # filled once the builder's features are known

    def _generate_examples(self):
        yield from enumerate(rows)

    def _info(self):
        info = base_info(self)
        info.as_proto.disable_shuffling = True  # records stay in the order given
        return info

    attrs: dict[str, Any] = {"name": name.split("/")[0], "_info": _info, "_split_generators": _split_generators,
                             "_generate_examples": _generate_examples}
    if base is None:
        base = tfds.core.GeneratorBasedBuilder
        base_info = lambda self: tfds.core.DatasetInfo(builder=self, features=features)  # noqa: E731
        attrs.update(VERSION=tfds.core.Version(TFDS_VERSION), RELEASE_NOTES={TFDS_VERSION: "Written locally."})
    else:
        base_info = base._info
    cls = type(f"Local_{name}", (base,), attrs, skip_registration=True)
    config = {"config": name.split("/", 1)[1]} if "/" in name else {}
    builder = cls(data_dir=os.fspath(data_dir), file_format="array_record", **config)
    if os.path.exists(os.fspath(builder.data_dir)):  # TFDS would keep it, or mix its metadata with the new data
        raise FileExistsError(f"TFDS dataset {name!r} is already in {os.fspath(data_dir)!r} "
                              f"({os.fspath(builder.data_dir)}); write it into another data_dir")
    rows.extend(dict(row) for row in (examples(builder.info.features) if callable(examples) else examples))
    builder.download_and_prepare()
    return builder


def write_tfds(data_dir: str | os.PathLike, name: str, images: np.ndarray, labels: Sequence[int] | None = None,
               captions: Sequence[Sequence[str]] | None = None, classnames: Sequence[str] | None = None,
               split: str = "test") -> str:
    """A local TFDS dataset (``tfds:NAME:SPLIT`` with ``data_dir``) with features ``image`` (PNG), ``label``
    (``ClassLabel`` with ``classnames``) and ``captions`` (a sequence of texts), each when given.

    Under a name TFDS registers (``imagenet2012``) the data gets that builder's features instead: images (RGB),
    labels below its class count and captions where it has such features, the image's file name in any other
    text feature; ``classnames`` must be None or its own names. Returns ``data_dir``.
    """
    tfds = _import_tfds()
    images, labels, captions, num_classes = _check(images, labels, captions, classnames)
    names = _lines(classnames, "classnames")
    features = None
    if registered_tfds_builder(name) is None:
        spec: dict[str, Any] = {"image": tfds.features.Image(shape=(*images.shape[1:3], 3 if images.ndim == 4 else 1),
                                                             encoding_format="png")}
        if labels is not None:
            spec["label"] = (tfds.features.ClassLabel(names=names) if names is not None
                             else tfds.features.ClassLabel(num_classes=num_classes))
        if captions is not None:
            spec["captions"] = tfds.features.Sequence(tfds.features.Text())
        features = tfds.features.FeaturesDict(spec)

    def examples(feats) -> Iterable[dict[str, Any]]:
        _check_features(name, feats, labels, captions, names)
        channels = feats["image"].shape[-1]
        for i, image in enumerate(images):
            row: dict[str, Any] = {"image": png_bytes(image, channels)}
            for key, feature in feats.items():
                if key == "label" and labels is not None:
                    row[key] = int(labels[i])
                elif key == "captions" and captions is not None:
                    row[key] = captions[i]
                elif isinstance(feature, tfds.features.Text):
                    row[key] = f"{i:06d}.png"
            yield row

    write_tfds_examples(data_dir, name, examples, features=features, split=split)
    return os.fspath(data_dir)


def _check_features(name: str, feats: Any, labels: np.ndarray | None, captions: list | None,
                               names: list[str] | None) -> None:
    """That ``feats`` (a registered builder's, or the ones ``write_tfds`` made) can hold the given data."""
    tfds = _import_tfds()
    keys = set(feats.keys())
    if "image" not in keys or not isinstance(feats["image"], tfds.features.Image):
        raise ValueError(f"TFDS dataset {name!r} has no 'image' Image feature ({sorted(keys)})")
    label = feats["label"] if "label" in keys else None
    if labels is not None:
        if not isinstance(label, tfds.features.ClassLabel):
            raise ValueError(f"TFDS dataset {name!r} has no 'label' ClassLabel feature for the labels")
        if labels.size and labels.max() >= label.num_classes:
            raise ValueError(f"TFDS dataset {name!r} has {label.num_classes} classes; got label {labels.max()}")
        if names is not None and list(label.names) != names:
            raise ValueError(f"TFDS dataset {name!r} names its own classes; give classnames=None")
    if captions is not None and "captions" not in keys:
        raise ValueError(f"TFDS dataset {name!r} has no 'captions' feature for the captions")
    unfilled = [k for k, f in feats.items() if k not in ("image", "label", "captions")
                and not isinstance(f, tfds.features.Text)]
    unfilled += [k for k in ("label", "captions") if k in keys and {"label": labels, "captions": captions}[k] is None]
    if unfilled:
        raise ValueError(f"TFDS dataset {name!r}: no data for its features {unfilled}")
