"""One evaluation (``train.eval_hook``) with toy encoders: what the objectives add (heads, scalars), which
parameters are fetched, and nothing at all when ``config.evals.run`` is 'none'."""
import jax
import numpy as np
import pytest

from clus_jax.evaluate import artifacts
from clus_jax.evaluate import registry as evaluators
from clus_jax.evaluate.encoders import Encoders
from clus_jax.evaluate.runner import Evaluation
from clus_jax.objectives import registry as objectives
from clus_jax.train import eval_hook

import train_helpers as helpers  # registered by tests/conftest.py

SEEN = []  # the contexts the recording evaluator ran with


class Recording(evaluators.Evaluator):
    """Records its context; reports the number of heads."""

    name = "test_recording"

    def run(self, settings, ctx):
        SEEN.append(ctx)
        return Evaluation({"recording/heads": float(len(ctx.heads))})


class Norms(objectives.Objective):
    """Reports the mean row norm of its own ``rows`` parameter at every evaluation."""

    name = "test_norms"

    def eval_metrics(self, params, config):
        return {"mean_norm": float(np.linalg.norm(params["rows"], axis=1).mean())}


@pytest.fixture(autouse=True)
def registered():
    evaluators.register(Recording)
    objectives.register(Norms)
    SEEN.clear()
    yield
    evaluators._REGISTRY.pop(Recording.name, None)
    objectives._REGISTRY.pop(Norms.name, None)


def never(_):
    raise AssertionError("no encoder is called")


def recording_config(objective_weights, run="rec"):
    config = helpers.tiny_config("clip")
    config.objectives = objective_weights
    config.evals.rec = {"type": "test_recording"}
    config.evals.run = run
    return config


NEVER = Encoders(never, never, never, 8)  # encoders that must not be called


def test_heads_and_scalars_of_the_objectives_reach_the_evaluation(tmp_path):
    order = (10, 2, 0, 1, 3, 4, 5, 6, 7, 8, 9)
    params = {"image": {}, "swap": {f"bank_{i}": np.full((2, 3), i, np.float32) for i in order},
              "test_norms": {"rows": jax.numpy.asarray([[3.0, 4.0], [0.0, 1.0]])}}
    fetched = []

    def params_of(name):
        fetched.append(name)
        return eval_hook.state_params(params)(name)

    config = recording_config({"clip": 1.0, "swap": 0.5, "test_norms": 0.0})
    out = eval_hook.evaluate_and_save(config, ("image", "text"), NEVER, params_of, str(tmp_path), 7).metrics
    assert fetched == ["swap", "test_norms"]  # clip adds nothing: its parameters are not asked for
    (ctx,) = SEEN
    assert list(ctx.heads) == [f"bank_{i}" for i in range(11)]  # bank order, not the tree's
    assert all(np.all(ctx.heads[f"bank_{i}"] == i) for i in range(11))
    assert ctx.modalities == ("image", "text") and ctx.config is config
    assert out == {"recording/heads": 11.0, "objectives/test_norms/mean_norm": 3.0}
    assert artifacts.read_metrics(artifacts.step_dir(str(tmp_path), 7)) == out


def test_none_runs_no_evaluation_and_writes_nothing(tmp_path):
    def params_of(name):
        raise AssertionError("no parameter is fetched")

    for run in ("none", ""):
        config = recording_config({"clip": 1.0, "test_norms": 0.0}, run=run)
        assert eval_hook.evaluate_and_save(config, ("image",), NEVER, params_of, str(tmp_path), 1).metrics == {}
    assert SEEN == [] and artifacts.steps(str(tmp_path)) == []


def test_state_params_are_host_arrays_and_empty_for_an_objective_without_parameters():
    params = {"swap": {"bank_0": jax.numpy.ones((2, 3))}}
    host = eval_hook.state_params(params)
    assert type(host("swap")["bank_0"]) is np.ndarray
    assert host("clip") == {}
