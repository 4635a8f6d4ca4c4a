"""Several local processes of one JAX job (jax.distributed on 127.0.0.1, gloo on CPU): a free coordinator port
and each process's environment, as ``clus_jax.parallel.distributed.maybe_initialize`` reads it. Shared by the
tests that start such jobs (registered as ``local_processes`` by tests/conftest.py)."""
from __future__ import annotations

import os
import socket


def free_port() -> int:
    """A TCP port nothing listens on now, for the job's coordinator."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_env(port: int, count: int, index: int, local_devices: int, **extra: str) -> dict[str, str]:
    """The environment of process ``index`` of ``count``, each with ``local_devices`` fake CPU devices, on top
    of this process's own; ``extra``: more variables (e.g. ``CLUS_JAX_HEARTBEAT_TIMEOUT='10'``)."""
    return {**os.environ, "CLUS_JAX_COORDINATOR": f"127.0.0.1:{port}", "CLUS_JAX_NUM_PROCESSES": str(count),
            "CLUS_JAX_PROCESS_ID": str(index), "JAX_PLATFORMS": "cpu",
            "XLA_FLAGS": f"--xla_force_host_platform_device_count={local_devices}", "PYTHONUNBUFFERED": "1", **extra}
