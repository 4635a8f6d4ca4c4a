"""Frozen teachers from a finished clus_jax run or an open_clip checkpoint (``config.swap.teacher_checkpoint``).

The swap objective loads a frozen teacher inside the sharded init, and it may have other towers than the student
(``config.swap.teacher_model``). It reads clus_jax checkpoints itself; open_clip checkpoints are read through
``clus_jax.interop``, a layer above the objectives, so ``install`` hands interop's reader down to them
(``objectives.teachers.add_reader``) before a run is built. ``use_frozen_teacher`` is what
``configs/clus.py:teacher=PATH`` does: the teacher's towers, banks and tokenizer from the source itself.
"""
from __future__ import annotations

import ml_collections

from clus_jax.common.errors import ConfigError
from clus_jax.config import run_config
from clus_jax.interop import open_clip
from clus_jax.objectives import prototypes, teachers


def source_config(path: str, model_file: str = "") -> ml_collections.ConfigDict:
    """The config a teacher source stands for: a run's ``config.json``, or the clus_jax config of an open_clip
    checkpoint (``model_file``: its open_clip model config, '' for a folder that holds its own)."""
    if open_clip.is_source(path):
        _, model_cfg, preprocess_cfg = open_clip.resolve(path, model_file or None)
        return open_clip.run_config(model_cfg, preprocess_cfg)
    return run_config.load_run_config(path)


def install() -> None:
    """Lets frozen teachers be open_clip checkpoints (idempotent)."""
    teachers.add_reader("open_clip", teachers.Reader(
        is_source=open_clip.is_source,
        model_config=lambda path, model_file: source_config(path, model_file).model,
        read_params=lambda path, model_file: open_clip.read_params(path, model_file or None),
    ))


def use_frozen_teacher(config: ml_collections.ConfigDict, path: str, model_file: str = "", step: int = -1) -> None:
    """Makes the run's swap teacher the frozen one at ``path``, with its own towers.

    Sets ``config.swap``: teacher='checkpoint', teacher_model = the source's ``config.model``, its prototype banks
    when it saved some (a Clus run), else banks initialised and kept frozen ('random'); and the student's
    tokenizer and vocabulary to the teacher's, since the teacher reads the student's tokens. ConfigError naming
    ``path`` when it is neither a run nor an open_clip checkpoint.
    """
    try:
        source = source_config(path, model_file)
        banks = not open_clip.is_source(path) and prototypes.PARAMS_KEY in teachers.saved_param_shapes(
            path, None if step < 0 else step)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"teacher={path!r}: {e}") from None
    config.swap.update(dict(
        teacher="checkpoint", teacher_checkpoint=path, teacher_checkpoint_step=step, teacher_open_clip_config=model_file,
        teacher_model=ml_collections.ConfigDict(source.model.to_dict()),
        teacher_prototypes="teacher" if banks else "random",
    ))
    config.tokenizer = ml_collections.ConfigDict(source.tokenizer.to_dict())
    config.model.text.vocab_size = int(source.model.text.vocab_size)
