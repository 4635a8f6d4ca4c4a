"""What a test compares to show that a failed command changed none of the user's files, and that one that moves
something aside by design changed nothing else."""
from __future__ import annotations

import hashlib
import os


def snapshot(path: str) -> dict[str, str] | None:
    """Every file under ``path`` (or the file itself) -> its SHA-256, folders -> 'dir'; None when absent."""
    if not os.path.lexists(path):
        return None
    if not os.path.isdir(path):
        with open(path, "rb") as f:
            return {".": hashlib.sha256(f.read()).hexdigest()}
    out = {}
    for root, dirs, files in os.walk(path):
        for name in dirs:
            out[os.path.relpath(os.path.join(root, name), path)] = "dir"
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                out[os.path.relpath(os.path.join(root, name), path)] = hashlib.sha256(f.read()).hexdigest()
    return out


def moved(before: dict[str, str], folder: str, to: str) -> dict[str, str]:
    """A snapshot ``before`` as it reads once ``folder`` (a path relative to its root) was renamed ``to``."""
    def where(path: str) -> str:
        return to + path[len(folder):] if path == folder or path.startswith(folder + os.sep) else path

    return {where(path): digest for path, digest in before.items()}
