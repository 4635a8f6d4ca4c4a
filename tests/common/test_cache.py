"""Where fetched assets are cached, and finding an installed package without importing it."""
import hashlib
import sys
import zipfile
from pathlib import Path

import pytest

from clus_jax.common import cache


def test_cache_dir_from_the_environment_or_home(monkeypatch, tmp_path):
    monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path / "c"))
    assert cache.cache_dir() == tmp_path / "c"
    monkeypatch.setenv(cache.CACHE_ENV, "~/assets")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert cache.cache_dir() == tmp_path / "assets"  # a literal ~ is the home folder
    monkeypatch.delenv(cache.CACHE_ENV)
    assert cache.cache_dir() == tmp_path / ".cache" / "clus_jax"


def test_package_dir_without_importing(tmp_path, monkeypatch):
    (tmp_path / "unimported_pkg").mkdir()
    (tmp_path / "unimported_pkg" / "__init__.py").write_text("raise ImportError('imported')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert cache.package_dir("unimported_pkg") == Path(tmp_path / "unimported_pkg")
    assert "unimported_pkg" not in sys.modules
    assert cache.package_dir("no_such_package_here") is None
    assert cache.package_dir("json.decoder") is None  # a module, not a package folder


def _wheel(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def test_fetch_wheel_files_one_download_checked_and_cached(tmp_path):
    files = {"pkg/a.txt": b"alpha", "pkg/data/b.bin": b"\x00beta"}
    calls = []

    def download(tmp):
        calls.append(tmp)
        return _wheel(tmp / "pkg-1.0-py3-none-any.whl", files)

    wanted = {m: (tmp_path / "c" / Path(m).name, hashlib.sha256(d).hexdigest()) for m, d in files.items()}
    out = cache.fetch_wheel_files("pkg==1.0", wanted, download=download)
    assert {m: p.read_bytes() for m, p in out.items()} == files
    assert len(calls) == 1 and not calls[0].exists()  # one wheel for both files, deleted afterwards
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["a.txt", "b.bin"]  # no temporary files left
    assert cache.fetch_wheel_files("pkg==1.0", wanted, download=None) == out  # from the cache, no download

    (tmp_path / "c" / "a.txt").write_bytes(b"damaged")  # a cached copy with the wrong digest is fetched again
    assert cache.fetch_wheel_member("pkg==1.0", "pkg/a.txt", *wanted["pkg/a.txt"], download=download).read_bytes() \
        == b"alpha"
    assert len(calls) == 2


def test_fetch_wheel_member_refuses_wrong_content_and_missing_member(tmp_path):
    download = lambda tmp: _wheel(tmp / "w.whl", {"pkg/a.txt": b"tampered"})
    dest = tmp_path / "c" / "a.txt"
    with pytest.raises(ValueError, match="sha256 mismatch for pkg/a.txt"):
        cache.fetch_wheel_member("pkg==1.0", "pkg/a.txt", dest, hashlib.sha256(b"alpha").hexdigest(),
                                 download=download)
    assert not (tmp_path / "c").exists()  # nothing written, not even the folder
    with pytest.raises(FileNotFoundError, match="pkg/b.txt is not in the wheel"):
        cache.fetch_wheel_member("pkg==1.0", "pkg/b.txt", dest, None, download=download)
    assert cache.fetch_wheel_member("pkg==1.0", "pkg/a.txt", dest, None, download=download).read_bytes() == b"tampered"
    assert cache.sha256_file(dest) == hashlib.sha256(b"tampered").hexdigest()
