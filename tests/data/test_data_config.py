"""The data config: its keys and defaults, and the values it refuses (side-file paths: test_side_fields.py)."""
import pytest

from clus_jax.data import data_config


def test_default_config_has_the_contract_keys():
    keys = {"source", "path", "split", "tfds_data_dir", "image_key", "caption_key", "cache_dir", "num_workers",
            "prefetch", "min_crop_scale", "flip", "synthetic_size", "side_fields", "subset"}
    assert set(data_config.default_data_config().keys()) == keys
    with pytest.raises(ValueError, match="unknown data config keys"):
        data_config.resolve_data_config({"source": "synthetic", "batch_size": 3})
    with pytest.raises(ValueError, match="source"):
        data_config.resolve_data_config({"source": "webdataset"})
