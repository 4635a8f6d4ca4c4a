"""The estimated time to finish a run, printed on every progress line.

The first step of a process compiles the train step (a minute on a slow 2-core host), and the steps right
after it still warm caches and the input pipeline. An estimate from the last log window alone counts the
compilation in the first window and then swings with every window's noise. ``Eta`` takes the rate of all
steps since ``warmup`` steps after the process's first one, so it settles as soon as that rate has a few
windows behind it, and adds the time of the evaluations still to come, once one has been measured.
"""
from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Callable

import numpy as np


class Eta:
    """Seconds left in a run of ``total`` steps that (re)started at ``start_step``.

    ``eval_every``: the steps between the runs of each evaluation entry (``evaluate.registry.every`` of each
    entry that runs; one int for a single schedule; 0: after the last step only). An evaluation happens at every
    step before the end where any entry is due (``evaluate.registry.due``), and once after the last step.

    Call ``step(n)`` after step n is dispatched and ``evaluated(seconds)`` after each evaluation; ``left(n)``
    is the remaining steps times the steady step time, plus the evaluations still to come at the last one's
    measured cost.
    """

    def __init__(self, total: int, start_step: int, eval_every: int | Sequence[int] = 0, warmup: int = 5,
                 clock: Callable[[], float] = time.monotonic):
        self.total, self.start_step, self.warmup, self.clock = total, start_step, warmup, clock
        periods = sorted({int(e) for e in ([eval_every] if isinstance(eval_every, int) else eval_every) if e})
        # The steps before the end at which any entry is due, once: a search per progress line.
        self.eval_steps = np.unique(np.concatenate(
            [np.arange(e, total, e, dtype=np.int64) for e in periods] or [np.zeros(0, np.int64)]))
        self.t0 = clock()
        self.steady: tuple[int, float] | None = None  # (step, time) where the steady rate is measured from
        self.eval_s: float | None = None
        self.eval_total = 0.0

    def step(self, n: int) -> None:
        if self.steady is None and n >= self.start_step + self.warmup:
            self.steady = (n, self.clock())
            self.eval_total = 0.0

    def evaluated(self, seconds: float) -> None:
        self.eval_s = seconds
        self.eval_total += seconds

    def step_seconds(self, n: int) -> float:
        """Seconds per step: the steady rate (evaluations taken out), or the whole run's rate before it."""
        now = self.clock()
        if self.steady is not None and n > self.steady[0]:
            return (now - self.steady[1] - self.eval_total) / (n - self.steady[0])
        return (now - self.t0) / max(n - self.start_step, 1)

    def evals_left(self, n: int) -> int:
        """Evaluations after step n: at the steps before the end where any entry is due, and the final one."""
        return 1 + len(self.eval_steps) - int(np.searchsorted(self.eval_steps, n, side="right"))

    def left(self, n: int) -> float:
        evals = self.evals_left(n) * self.eval_s if self.eval_s is not None else 0.0
        return max(self.total - n, 0) * self.step_seconds(n) + evals
