"""What a test compares to show that a failed command changed none of the user's files."""
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
