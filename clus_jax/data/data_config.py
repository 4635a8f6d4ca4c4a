"""The data config (``config.data``): every key with its default, and its validation before a run starts.

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
                  ``if __name__ == '__main__':`` guard; the pipeline marks absl flags parsed if needed.
  prefetch        batches prepared ahead in a background thread (0: none); the per-example
                  read-ahead is ``prefetch * local_batch_size`` examples.
  min_crop_scale  lower bound of the random-resized-crop area fraction (upper bound 1).
  flip            random horizontal flips (off by default: emoji names say "facing right").
  synthetic_size  number of examples of the synthetic source.
  side_fields     {field name: path} of side files (``side_fields.py``: a ``.npy`` of ``[N, *shape]`` or
                  a directory of shards with a ``manifest.json``) holding one row per record of the full
                  source, keyed by record index. An empty path means "not from a side file". Config
                  files that use one declare it, e.g. ``config.data.side_fields = {'cluster_labels': ''}``,
                  so ``--config.data.side_fields.cluster_labels=/path`` can set it (ml_collections
                  overrides only keys that exist).
  subset          optional path to the record indices to train on (a ``.npy`` of integers, or a side-file
                  directory with an ``index`` field): record j is record ``subset[j]`` of the source.
                  Side fields stay keyed by the original record index.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import ml_collections

from clus_jax.data import side_fields as side_fields_lib
from clus_jax.data.fields import IMAGE, SKIPPED, TEXT

SOURCES = ("embedded", "synthetic", "array_record", "tfds", "tar")


def default_data_config() -> ml_collections.ConfigDict:
    """All data config keys (listed in the module docstring), with defaults suited to the embedded dataset.

    Optional strings are typed references, so ``--config.data.path=...`` works from the command line.
    ``side_fields`` is an empty dict: a config declares the names it uses (see the module docstring).
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
        "side_fields": ml_collections.ConfigDict(),
        "subset": optional_str(),
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
    merged["side_fields"] = _resolve_side_fields(merged["side_fields"])
    if merged["subset"]:
        _check_path("config.data.subset", merged["subset"], index_field=True)
    return ml_collections.ConfigDict(merged)


def _check_path(key: str, path: Any, index_field: bool = False) -> None:
    """Raises ValueError naming ``key`` unless ``path`` is a readable side file (or subset)."""
    if not isinstance(path, (str, os.PathLike)):
        raise ValueError(f"{key}={path!r} must be a path")
    if not os.path.exists(os.path.expanduser(os.fspath(path))):
        raise ValueError(f"{key}={os.fspath(path)!r} does not exist")
    try:
        side_fields_lib.SideFieldReader(path, field=side_fields_lib.INDEX_FIELD if index_field else key.split(".")[-1])
    except (OSError, ValueError) as e:
        raise ValueError(f"{key}: {e}") from None


def _resolve_side_fields(side_fields: Any) -> dict[str, str]:
    """``side_fields`` without the unset (empty) entries, each path checked."""
    if side_fields is None:
        return {}
    if not isinstance(side_fields, Mapping):
        raise ValueError(f"config.data.side_fields must be a dict of field name -> path, got {side_fields!r}")
    out = {}
    for name, path in side_fields.items():
        key = f"config.data.side_fields.{name}"
        if name in (IMAGE, TEXT, SKIPPED):
            raise ValueError(f"{key}: {name!r} cannot come from a side file")
        if path in (None, ""):
            continue
        _check_path(key, path)
        out[str(name)] = os.fspath(path)
    return out
