"""clus_jax.common.hostmem: with 'retain', freed large blocks stay resident; with 'system', glibc unmaps them.

Each case runs in a fresh interpreter, since the allocator setting is process-wide and binds only threads
that have not allocated yet.
"""
import os
import subprocess
import sys

import pytest

from clus_jax.common import hostmem

PROBE = r"""
import json
from clus_jax.common import hostmem

def rss_kib():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))

applied = hostmem.retain_freed_memory()
before = rss_kib()
block = bytearray(256 * 2**20)  # 256 MiB, zero-filled: every page touched
during = rss_kib()
del block
after = rss_kib()
print(json.dumps(dict(applied=applied, before=before, during=during, after=after)))
"""

linux_glibc = pytest.mark.skipif(
    not sys.platform.startswith("linux") or os.confstr("CS_GNU_LIBC_VERSION") is None, reason="needs glibc")


def _probe(mode: str) -> dict:
    import json

    env = dict(os.environ, **{hostmem.ENV_VAR: mode})
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@linux_glibc
def test_retain_keeps_freed_block_resident():
    r = _probe("retain")
    assert r["applied"] is True
    grown = r["during"] - r["before"]
    assert grown > 200 * 1024  # the block was really touched
    assert r["after"] - r["before"] > 0.9 * grown  # and is still mapped after free


@linux_glibc
def test_system_mode_leaves_glibc_default():
    r = _probe("system")
    assert r["applied"] is False
    grown = r["during"] - r["before"]
    assert grown > 200 * 1024
    assert r["after"] - r["before"] < 0.1 * grown  # glibc returned the mmap'd block


def test_unknown_mode_is_a_clear_error(monkeypatch):
    monkeypatch.setenv(hostmem.ENV_VAR, "jemalloc")
    with pytest.raises(ValueError, match="CLUS_JAX_HOST_MALLOC"):
        hostmem.requested_mode()
