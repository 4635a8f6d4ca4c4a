"""The evaluator seam: ``config.evals`` entries by name, the checks that name the key, settings over defaults."""
import numpy as np
import pytest

from clus_jax.common.errors import ConfigError
from clus_jax.config import check as config_check
from clus_jax.evaluate import registry
from clus_jax.evaluate.runner import Evaluation

import train_helpers as helpers  # registered by tests/conftest.py


class Scaled(registry.Evaluator):
    """Reports its ``scale`` setting times the number of heads, and the entry it ran as."""

    name = "test_scaled"
    defaults = {"scale": 1.0}

    def validate(self, settings, config):
        if settings.scale <= 0:
            raise ConfigError(f"config.evals.{settings.entry}.scale={settings.scale!r} must be > 0")

    def run(self, settings, ctx):
        return Evaluation({f"scaled/{settings.entry}/value": settings.scale * len(ctx.heads)})


@pytest.fixture(autouse=True)
def scaled():
    registry.register(Scaled)
    yield
    registry._REGISTRY.pop(Scaled.name, None)


def context(config, heads=None):
    def never(_):
        raise AssertionError("this evaluator encodes nothing")

    return registry.EvalContext(never, never, ("image", "text"), heads or {}, config)


def config_with(run, **entries):
    config = helpers.tiny_config("clip")
    config.evals.run = run
    for name, entry in entries.items():
        config.evals[name] = entry
    return config


def test_the_default_config_runs_the_embedded_entry():
    config = helpers.tiny_config("clip")
    config.evals.run = "embedded"
    config_check.validate(config, num_devices=8)
    assert registry.run_names(config) == ["embedded"]
    assert registry.settings(config, "embedded").to_dict() == {"type": "embedded", "knn_k": 20, "entry": "embedded"}
    assert "embedded" in registry.names()


@pytest.mark.parametrize("run,names", [("none", []), ("", []), (" a , b,", ["a", "b"]), ("embedded", ["embedded"])])
def test_run_names(run, names):
    assert registry.run_names(config_with(run)) == names


@pytest.mark.parametrize("run,entries,pattern", [
    ("embedded,nope,nada", {}, r"^config\.evals\.run='embedded,nope,nada': no entry config\.evals\.<name> for "
                               r"\['nope', 'nada'\]; entries: \['embedded'\]$"),
    ("embedded", {"mine": {"type": "no_such"}},
     r"^config\.evals\.mine\.type='no_such' is not an evaluator; known: \[.*'embedded'.*'test_scaled'.*\]$"),
    ("mine", {"mine": {"scale": 2.0}}, r"^config\.evals\.mine\.type=None is not an evaluator"),
    ("mine", {"mine": {"type": "test_scaled", "scael": 2.0}},
     r"^config\.evals\.mine\.scael is not a setting of evaluator 'test_scaled'; its settings: \['scale'\]$"),
    ("mine", {"mine": {"type": "test_scaled", "scale": -1.0}}, r"^config\.evals\.mine\.scale=-1\.0 must be > 0$"),
    ("embedded", {"embedded": {"type": "embedded", "knn_k": 0}},
     r"^config\.evals\.embedded\.knn_k=0 must be an integer >= 1$"),
    ("embedded", {"sets": "none"}, r"^config\.evals\.sets='none' is neither a shared setting"),
    ("embedded", {"batch_size": 0}, r"^config\.evals\.batch_size=0 must be an integer > 0$"),
])
def test_a_bad_entry_is_one_error_naming_its_key(run, entries, pattern):
    with pytest.raises(ConfigError, match=pattern):
        config_check.validate(config_with(run, **entries), num_devices=8)


def test_an_entry_that_does_not_run_is_not_validated_by_its_evaluator():
    config_check.validate(config_with("none", mine={"type": "test_scaled", "scale": -1.0}), num_devices=8)


def test_settings_reach_the_evaluator_over_its_defaults():
    config = config_with("plain,tripled", plain={"type": "test_scaled"}, tripled={"type": "test_scaled", "scale": 3.0})
    config_check.validate(config, num_devices=8)
    heads = {"a": np.eye(2), "b": np.eye(2)}
    out = registry.run(config, context(config, heads))
    assert out.metrics == {"scaled/plain/value": 2.0, "scaled/tripled/value": 6.0} and out.arrays == {}


def test_two_entries_that_give_one_metric_are_an_error():
    class Fixed(Scaled):
        name = "test_fixed"

        def run(self, settings, ctx):
            return Evaluation({"fixed/value": 1.0})

    registry.register(Fixed)
    try:
        config = config_with("a,b", a={"type": "test_fixed"}, b={"type": "test_fixed"})
        with pytest.raises(ConfigError, match=r"config\.evals\.run='a,b': entry 'b' gives \['fixed/value'\] again"):
            registry.run(config, context(config))
    finally:
        registry._REGISTRY.pop(Fixed.name, None)


def test_register_needs_a_name_and_keeps_the_reserved_keys():
    class Nameless(registry.Evaluator):
        pass

    class Reserved(registry.Evaluator):
        name = "test_reserved"
        defaults = {"entry": "x"}

    with pytest.raises(ValueError, match="has no name"):
        registry.register(Nameless)
    with pytest.raises(ValueError, match="may not use the keys"):
        registry.register(Reserved)
    with pytest.raises(ConfigError, match=r"unknown evaluator 'test_reserved'"):
        registry.get("test_reserved")
