"""Fault injection for the fault-tolerance tests: kill this process at a chosen point of the loop.

``CLUS_JAX_FAULT=<event>:<step>`` sends SIGKILL to the process itself when ``event`` happens at ``step``:
``after_step`` (right after the step is dispatched) or ``during_save`` (right after an asynchronous
checkpoint save is issued, while it is still being written); ``after_iteration`` is k-means's (``python -m
clus_jax.cluster``: as pass ``step`` of the clustering begins). Unset, it does nothing.
"""
from __future__ import annotations

import os
import signal

EVENTS = ("after_step", "during_save", "after_iteration")


def _parse() -> tuple[str, int] | None:
    spec = os.environ.get("CLUS_JAX_FAULT")
    if not spec:
        return None
    event, _, step = spec.partition(":")
    if event not in EVENTS or not step.isdigit():
        raise ValueError(f"CLUS_JAX_FAULT={spec!r} must be '<{'|'.join(EVENTS)}>:<step>'")
    return event, int(step)


def maybe_inject(event: str, step: int) -> None:
    fault = _parse()
    if fault == (event, step):
        os.kill(os.getpid(), signal.SIGKILL)
