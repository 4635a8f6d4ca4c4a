"""The progress line's ETA: within 20% of the true time left from 10% of the steps on, on a run whose first
step compiles for a long time, whose windows are noisy and which evaluates periodically (one schedule, or
entries with schedules of their own, run when ``evaluate.registry.due`` says)."""
import ml_collections
import numpy as np
import pytest

from clus_jax.common.cli import format_eta
from clus_jax.evaluate import registry
from clus_jax.train.progress import Eta


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def evals_config(*every, eval_every=0):
    """A config whose entries e0, e1, ... run every ``every[i]`` steps (0: ``eval_every``)."""
    entries = {f"e{i}": {"type": "knn", "every": e} for i, e in enumerate(every)}
    return ml_collections.ConfigDict({"eval_every": eval_every, "evals": {"run": ",".join(entries), **entries}})


def simulate(total, compile_s, step_s, eval_every=0, eval_s=0.0, start_step=0, noise=0.3, seed=0):
    """(step, eta printed, true time left) for every step of a simulated run. ``eval_every``: one schedule, or
    the ``every`` of each entry; the loop's evaluations run where ``registry.due`` names an entry."""
    rng = np.random.default_rng(seed)
    clock = Clock()
    eta = Eta(total, start_step, eval_every, clock=clock)
    config = evals_config(*eval_every) if isinstance(eval_every, tuple) else evals_config(eval_every)
    step_times = step_s * (1 + noise * rng.uniform(-1, 1, total))
    events = []
    for n in range(start_step + 1, total + 1):
        clock.now += step_times[n - 1] + (compile_s if n == start_step + 1 else 0.0)
        eta.step(n)
        if registry.due(config, n) and n < total:
            clock.now += eval_s
            eta.evaluated(eval_s)
        events.append((n, eta.left(n), clock.now))
    end = clock.now + eval_s  # the final evaluation
    return [(n, left, end - now) for n, left, now in events]


@pytest.mark.parametrize("compile_s,eval_every,eval_s,start_step", [
    (60.0, 0, 0.0, 0),      # the default run on a slow host: a minute of compilation, one evaluation at the end
    (120.0, 100, 20.0, 0),  # periodic evaluations
    (60.0, 0, 0.0, 300),    # a resumed run: it compiles again
    (120.0, (40, 60), 10.0, 0),  # two entries on schedules of their own: at 40, 60, 80, 120, ... (19 before the end)
])
def test_eta_within_20_percent_after_10_percent_of_the_steps(compile_s, eval_every, eval_s, start_step):
    total = 600
    # An evaluation's cost is known once one has run: periodic ones count from the first on.
    begin = max(0.1 * (total - start_step), min(eval_every) if isinstance(eval_every, tuple) else eval_every)
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


def test_the_evaluations_left_are_the_steps_where_any_entry_is_due():
    """Entries every 2 and 3 steps of 12 (and one on config.eval_every = 4): an evaluation at 2, 3, 4, 6, 8, 9, 10
    before the end, and the final one after step 12."""
    config = evals_config(2, 3, 0, eval_every=4)
    every = [registry.every(config, name) for name in registry.run_names(config)]
    assert every == [2, 3, 4]
    eta = Eta(12, 0, every)
    for n in range(13):
        assert eta.evals_left(n) == 1 + sum(bool(registry.due(config, s)) for s in range(n + 1, 12)), n
    assert [eta.evals_left(n) for n in (0, 2, 5, 10, 11)] == [8, 7, 5, 1, 1]
    assert Eta(12, 0, 0).evals_left(0) == Eta(12, 0, []).evals_left(0) == 1  # no schedule: the final one only
