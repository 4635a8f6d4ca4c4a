"""Writing files so that a crash or a failed command never leaves a half-written one behind.

A file is written to a temporary name beside its destination (same directory, so the same file system)
and renamed over it: readers see the old file or the new one, never a part. ``epath`` paths (local or
``gs://``) and plain strings are both accepted. ``claim_directory`` is a stage's spec file in its ``--out``:
written on the first run, checked on every re-run.
"""
from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterator
from typing import IO, Any

import numpy as np
from etils import epath

from clus_jax.common.errors import UsageError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[epath.Path]:
    """A temporary name beside ``path`` for the block to write a file (or fill a folder) at; renamed to
    ``path`` when the block ends without an error, removed in any case.

    For writers that take a path rather than a file object (ArrayRecord) and for folders extracted whole.
    """
    path = epath.Path(path)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    try:
        yield tmp
        tmp.replace(path)
    finally:
        if tmp.is_dir():
            tmp.rmtree()
        elif tmp.exists():
            tmp.unlink()


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], Any]) -> None:
    """Calls ``write(f)`` on a temporary file beside ``path``, then renames it to ``path``."""
    with atomic_path(path) as tmp, tmp.open("wb") as f:
        write(f)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


def atomic_write_json(path: str | os.PathLike, value: Any, indent: int | None = 1) -> None:
    atomic_write_bytes(path, (json.dumps(value, indent=indent) + ("\n" if indent is not None else "")).encode())


def atomic_save_npy(path: str | os.PathLike, array: np.ndarray) -> None:
    """``np.save`` of a C-contiguous copy (the bytes on disk do not depend on the array's strides)."""
    atomic_write(path, lambda f: np.save(f, np.ascontiguousarray(array)))


def claim_directory(directory: str | os.PathLike, spec_file: str, spec: dict[str, Any], holds: str, *,
                    partial: bool = False) -> None:
    """Writes a stage's ``spec`` (what it makes and with which settings) as ``directory/spec_file``, or, when an
    earlier run wrote one, checks that it made the same thing, so a re-run may resume into ``--out`` but another
    job never mixes its files with it. Raises ``UsageError`` naming the keys that differ: ``--out DIR holds
    {holds} (different ...)``. ``partial=True`` compares only the keys ``spec`` has and writes nothing: the
    check a stage can make before its expensive step finds the rest of the spec."""
    spec = json.loads(json.dumps(spec))  # as read back from the file: tuples are lists
    path = epath.Path(directory) / spec_file
    if not path.exists():
        if not partial:
            atomic_write_json(path, spec)
        return
    old = json.loads(path.read_text())
    differ = sorted(k for k in (set(spec) if partial else set(spec) | set(old)) if old.get(k) != spec.get(k))
    if differ:
        raise UsageError(f"--out {os.fspath(directory)} holds {holds} (different {', '.join(differ)} in "
                         f"{spec_file}); pass another --out")
