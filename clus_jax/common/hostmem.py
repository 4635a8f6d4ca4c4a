"""Host allocator setting: keep freed memory in the process so large buffers are not page-faulted every step.

XLA:CPU allocates a step's temporaries with ``malloc`` on every execution. glibc serves blocks above its
mmap threshold with fresh ``mmap`` calls (in worker-thread arenas, whatever their size) and unmaps them on
``free``, so each step touches every page of its activations anew: on the 2-core reference host a
491 MB elementwise op takes 154 ms with the default allocator and 34 ms with freed memory kept (see
BENCHMARKS.md, "Host allocator"). ``retain_freed_memory`` sets, through ``mallopt``:

* ``M_MMAP_MAX = 0``: large blocks come from the heap, not from ``mmap``;
* ``M_TRIM_THRESHOLD = 2**31 - 1``: freed heap memory is not handed back to the kernel;
* ``M_ARENA_MAX = 1``: every thread allocates from the main (``brk``) heap, so the two settings above
  apply to XLA's worker threads too (a secondary arena falls back to ``mmap`` for large blocks).

The process keeps its peak heap for its lifetime, which a training process reaches in its first step
anyway. The arena limit binds only threads that have not allocated yet, so call this first thing in a
program, before jax starts its thread pools. ``CLUS_JAX_HOST_MALLOC=system`` leaves the allocator alone.
"""
from __future__ import annotations

import ctypes
import os
import sys

ENV_VAR = "CLUS_JAX_HOST_MALLOC"
MODES = ("retain", "system")

# glibc's <malloc.h> parameter numbers
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
_TRIM_NEVER = 2**31 - 1  # mallopt takes an int

#: The same setting for a whole process from its start, e.g. a PyTorch process compared with this one: glibc
#: reads ``GLIBC_TUNABLES`` from the environment (tunables take a size_t, so "never trim" is 128 GiB here).
GLIBC_TUNABLES = "glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=137438953472"


def requested_mode() -> str:
    """The allocator mode asked for by ``CLUS_JAX_HOST_MALLOC`` ('retain' when unset)."""
    mode = os.environ.get(ENV_VAR, "retain").strip().lower() or "retain"
    if mode not in MODES:
        raise ValueError(f"{ENV_VAR}={mode!r}: expected one of {', '.join(MODES)}")
    return mode


def retain_freed_memory() -> bool:
    """Applies the 'retain' setting to glibc malloc; True when every ``mallopt`` call succeeded.

    A no-op returning False off Linux, on a C library without ``mallopt`` (e.g. musl), or when
    ``CLUS_JAX_HOST_MALLOC=system``.
    """
    if requested_mode() != "retain" or not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    results = [mallopt(_M_MMAP_MAX, 0), mallopt(_M_TRIM_THRESHOLD, _TRIM_NEVER), mallopt(_M_ARENA_MAX, 1)]
    return all(r == 1 for r in results)
