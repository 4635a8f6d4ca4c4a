"""Writing files so that a crash or a failed command never leaves a half-written one behind.

A file is written to a temporary name beside its destination (same directory, so the same file system)
and renamed over it: readers see the old file or the new one, never a part. ``epath`` paths (local or
``gs://``) and plain strings are both accepted.
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import IO, Any

import numpy as np
from etils import epath


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], Any]) -> None:
    """Calls ``write(f)`` on a temporary file beside ``path``, then renames it to ``path``."""
    path = epath.Path(path)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    try:
        with tmp.open("wb") as f:
            write(f)
        tmp.replace(path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


def atomic_write_json(path: str | os.PathLike, value: Any, indent: int | None = 1) -> None:
    atomic_write_bytes(path, (json.dumps(value, indent=indent) + ("\n" if indent is not None else "")).encode())


def atomic_save_npy(path: str | os.PathLike, array: np.ndarray) -> None:
    """``np.save`` of a C-contiguous copy (the bytes on disk do not depend on the array's strides)."""
    atomic_write(path, lambda f: np.save(f, np.ascontiguousarray(array)))
