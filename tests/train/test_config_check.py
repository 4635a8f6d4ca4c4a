"""Bad config values fail before compilation with a message naming the key."""
import types

import pytest

from clus_jax.config import check as config_check
from clus_jax.objectives.registry import ConfigError

import train_helpers as helpers  # registered by tests/conftest.py


@pytest.mark.parametrize(
    "overrides,pattern",
    [
        ({"batch_size": 12}, r"config\.batch_size=12 is not divisible by the data-parallel size 8"),
        ({"batch_size": 0}, r"config\.batch_size=0 must be an integer > 0"),
        ({"mesh.data": 16}, r"config\.mesh .* needs 16 devices but only 8"),
        ({"mesh.data": 3, "mesh.fsdp": -1}, r"config\.mesh: fixed axes use 3 devices"),
        ({"model.image.size": "XXL"}, r"config\.model\.image\.size: unknown image size"),
        ({"model.text.size": "giant"}, r"config\.model\.text\.size: unknown text size"),
        ({"model.image.image_size": 18}, r"config\.model\.image\.image_size=18 is not divisible by patch_size=4"),
        ({"model.dtype": "float8"}, r"config\.model\.dtype='float8'"),
        ({"optim.lr": 0.0}, r"config\.optim\.lr=0\.0 must be > 0"),
        ({"total_steps": -1}, r"config\.total_steps=-1"),
        ({"data.source": "s3"}, r"config\.data: data source must be one of"),
        ({"evals.run": "imagenet"}, r"config\.evals\.run='imagenet': no entry"),
        ({"optim.schedule_steps": 5}, r"config\.optim\.schedule_steps=5 must be 0 \(= total_steps\) or at least "
                                      r"config\.total_steps=10"),
        ({"init_from.path": "run", "init_from.mode": "all"}, r"config\.init_from\.mode='all' must be one of"),
        ({"init_from.path": "run", "init_from.mode": "resume", "init_from.exclude": "^text/"},
         r"config\.init_from\.exclude='\^text/': mode 'resume' restores every parameter"),
    ],
)
def test_bad_values_name_the_key(overrides, pattern):
    config = helpers.tiny_config("clip", **overrides)
    with pytest.raises(ConfigError, match=pattern):
        config_check.validate(config, num_devices=8)


def test_unknown_objective_and_bad_weight():
    config = helpers.tiny_config("clip")
    config.objectives = {"clop": 1.0}
    with pytest.raises(ConfigError, match=r"config\.objectives: unknown objective 'clop'"):
        config_check.validate(config, num_devices=8)
    config.objectives = {"clip": -1.0}
    with pytest.raises(ConfigError, match=r"config\.objectives\.clip=-1\.0 must be a weight >= 0"):
        config_check.validate(config, num_devices=8)


def test_siglip_needs_a_bias():
    config = helpers.tiny_config("clip")
    config.objectives = {"siglip": 1.0}
    with pytest.raises(ConfigError, match=r"config\.model\.logit_bias_init"):
        config_check.validate(config, num_devices=8)


def test_a_vocabulary_larger_than_the_text_table():
    """The tokenizer's ids must all have a row of the text tower's embedding (ids past it embed as NaN)."""
    config = helpers.tiny_config("clip", **{"model.text.vocab_size": 1000})
    config_check.validate(config, num_devices=8)  # without the tokenizer, nothing to compare
    tokenizer = types.SimpleNamespace(vocab_size=1001)
    with pytest.raises(ConfigError, match=r"config\.model\.text\.vocab_size=1000 is smaller than the vocabulary of "
                                          r"config\.tokenizer\.name='clip' \(1001 ids\)"):
        config_check.validate(config, num_devices=8, tokenizer=tokenizer)
    config_check.validate(config, num_devices=8, tokenizer=types.SimpleNamespace(vocab_size=1000))


def test_valid_config_resolves_the_mesh():
    config = helpers.tiny_config("clip", **{"mesh.fsdp": 2})
    assert config_check.validate(config, num_devices=8) == {"data": 4, "fsdp": 2, "tensor": 1}
