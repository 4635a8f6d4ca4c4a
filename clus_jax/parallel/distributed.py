"""Multi-process start-up from the environment (local, SLURM, TPU pods), before any other JAX call."""
from __future__ import annotations

import logging
import os

import jax

log = logging.getLogger(__name__)


def maybe_initialize() -> None:
    """Calls ``jax.distributed.initialize`` when the environment describes a multi-process job.

    Local runs set CLUS_JAX_COORDINATOR (host:port), CLUS_JAX_NUM_PROCESSES and CLUS_JAX_PROCESS_ID;
    on CPU the collectives go through gloo. CLUS_JAX_INIT_TIMEOUT and CLUS_JAX_HEARTBEAT_TIMEOUT (seconds)
    bound how long a process waits for missing peers. TPU pods and SLURM are detected by JAX itself when
    CLUS_JAX_DISTRIBUTED=auto.
    """
    coordinator = os.environ.get("CLUS_JAX_COORDINATOR")
    if coordinator:
        if os.environ.get("JAX_PLATFORMS", "").startswith("cpu") or os.environ.get("CLUS_JAX_CPU_COLLECTIVES"):
            jax.config.update("jax_cpu_collectives_implementation", os.environ.get("CLUS_JAX_CPU_COLLECTIVES", "gloo"))
        jax.distributed.initialize(
            coordinator_address=coordinator,
            num_processes=int(os.environ["CLUS_JAX_NUM_PROCESSES"]),
            process_id=int(os.environ["CLUS_JAX_PROCESS_ID"]),
            initialization_timeout=int(os.environ.get("CLUS_JAX_INIT_TIMEOUT", "120")),
            # A dead peer is noticed through missed heartbeats; the survivors then stop with an error
            # instead of waiting forever inside a collective.
            heartbeat_timeout_seconds=int(os.environ.get("CLUS_JAX_HEARTBEAT_TIMEOUT", "60")),
        )
    elif os.environ.get("CLUS_JAX_DISTRIBUTED") == "auto":
        jax.distributed.initialize()
    else:
        return
    log.info("process %d/%d: %d local devices, %d global", jax.process_index(), jax.process_count(),
             jax.local_device_count(), jax.device_count())
