"""Frozen teachers' sources (train/teacher_sources.py): a run's config or an open_clip checkpoint's, the reader
handed down to the objectives, and what ``configs/clus.py:teacher=PATH`` sets."""
import os

import pytest

from clus_jax.common.errors import ConfigError
from clus_jax.config import base as config_base
from clus_jax.config import check as config_check
from clus_jax.config.run_config import save_run_config
from clus_jax.objectives import teachers
from clus_jax.train import teacher_sources

import train_helpers as helpers  # registered by tests/conftest.py

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
VECTORS = os.path.join(REPO, "tests", "interop", "vectors")
WEIGHTS = os.path.join(VECTORS, "quickgelu", "open_clip_model.safetensors")
MODEL_JSON = os.path.join(VECTORS, "quickgelu", "model_config.json")


def test_source_config_of_a_run_and_of_open_clip(tmp_path):
    run = helpers.tiny_config("clip", **{"model.embed_dim": 48})
    save_run_config(str(tmp_path), run)
    assert teacher_sources.source_config(str(tmp_path)).model.to_dict() == run.model.to_dict()
    oc = teacher_sources.source_config(WEIGHTS, MODEL_JSON)
    assert oc.model.embed_dim == 16 and oc.model.image.image_size == 32 and oc.model.image.act == "quick_gelu"
    assert oc.tokenizer.name == "clip"
    folder = teacher_sources.source_config(os.path.join(VECTORS, "options"))  # a folder holds its own config
    assert folder.model.text.vocab_size == 1000


def test_install_hands_the_open_clip_reader_down(tmp_path):
    teacher_sources.install()
    teacher_sources.install()  # idempotent
    assert teachers.reader_for(str(tmp_path)) is None  # a run: the objectives read it themselves
    reader = teachers.reader_for(WEIGHTS)
    assert reader is not None and teachers.reader_for(os.path.join(VECTORS, "options")) is reader
    assert reader.model_config(WEIGHTS, MODEL_JSON).embed_dim == 16
    assert set(reader.read_params(WEIGHTS, MODEL_JSON)) >= {"image", "text", "image_proj", "text_proj"}


def test_configs_clus_teacher_is_use_frozen_teacher():
    spec = os.path.join(REPO, "configs", "clus.py") + f":steps=40,teacher={WEIGHTS},teacher_config={MODEL_JSON}"
    config = config_base.load_config(spec)
    want = config_base.load_config(os.path.join(REPO, "configs", "clus.py") + ":steps=40")
    teacher_sources.use_frozen_teacher(want, WEIGHTS, MODEL_JSON)
    assert config.to_dict() == want.to_dict()
    swap = config.swap
    assert (swap.teacher, swap.teacher_checkpoint, swap.teacher_open_clip_config) == ("checkpoint", WEIGHTS, MODEL_JSON)
    assert swap.teacher_prototypes == "random"  # open_clip saves no prototype banks
    assert swap.teacher_model.to_dict() == teacher_sources.source_config(WEIGHTS, MODEL_JSON).model.to_dict()
    assert config.model.embed_dim == 128  # the student keeps its own towers
    config_check.validate(config, 8)


def test_a_path_that_is_no_teacher_is_one_error(tmp_path):
    config = config_base.load_config(os.path.join(REPO, "configs", "clus.py"))
    with pytest.raises(ConfigError, match=r"^teacher='.*nowhere'.*config.json"):
        teacher_sources.use_frozen_teacher(config, str(tmp_path / "nowhere"))
    with pytest.raises(ConfigError, match=r"^teacher='.*safetensors'.*model config"):
        teacher_sources.use_frozen_teacher(config, WEIGHTS)  # a weights file needs its open_clip model config
    assert config.swap.teacher == "ema"  # unchanged
