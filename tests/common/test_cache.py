"""Where fetched assets are cached, and finding an installed package without importing it."""
import sys
from pathlib import Path

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
