"""The progress line's ETA: within 20% of the true time left from 10% of the steps on, on a run whose first
step compiles for a long time, whose windows are noisy and which evaluates periodically."""
import numpy as np
import pytest

from clus_jax.common.cli import format_eta
from clus_jax.train.progress import Eta


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def simulate(total, compile_s, step_s, eval_every=0, eval_s=0.0, start_step=0, noise=0.3, seed=0):
    """(step, eta printed, true time left) for every step of a simulated run."""
    rng = np.random.default_rng(seed)
    clock = Clock()
    eta = Eta(total, start_step, eval_every, clock=clock)
    step_times = step_s * (1 + noise * rng.uniform(-1, 1, total))
    events = []
    for n in range(start_step + 1, total + 1):
        clock.now += step_times[n - 1] + (compile_s if n == start_step + 1 else 0.0)
        eta.step(n)
        if eval_every and n % eval_every == 0 and n < total:
            clock.now += eval_s
            eta.evaluated(eval_s)
        events.append((n, eta.left(n), clock.now))
    end = clock.now + eval_s  # the final evaluation
    return [(n, left, end - now) for n, left, now in events]


@pytest.mark.parametrize("compile_s,eval_every,eval_s,start_step", [
    (60.0, 0, 0.0, 0),      # the default run on a slow host: a minute of compilation, one evaluation at the end
    (120.0, 100, 20.0, 0),  # periodic evaluations
    (60.0, 0, 0.0, 300),    # a resumed run: it compiles again
])
def test_eta_within_20_percent_after_10_percent_of_the_steps(compile_s, eval_every, eval_s, start_step):
    total = 600
    # An evaluation's cost is known once one has run: periodic ones count from the first on.
    begin = max(0.1 * (total - start_step), eval_every)
    for seed in range(3):
        for n, left, true in simulate(total, compile_s, 1.0, eval_every, eval_s, start_step, seed=seed):
            if n - start_step >= begin and n < total:
                assert abs(left - true) <= 0.2 * true, (n, left, true)


def test_the_previous_estimate_counted_the_compilation():
    """What the window estimate printed at 10% of a run that compiled for 60 s: the first 25-step window
    took 85 s, so its rate was 3.4 s/step against 1 s (planted here as the old formula, to show the gap)."""
    (n, left, true), = [e for e in simulate(600, 60.0, 1.0, noise=0.0) if e[0] == 25]
    old = (600 - 25) * (25 + 60.0) / 25
    assert old > 2 * true and abs(left - true) < 0.5 * true


def test_format_eta():
    assert format_eta(3725.9) == "1:02:05" and format_eta(-3) == "0:00:00"
