"""open_clip checkpoints in (``load_open_clip``, ``config.init_from``) and clus_jax runs out (``save_open_clip``).

    model = clus_jax.interop.load_open_clip("ViT-B-32.safetensors", "ViT-B-32.json")
    model.encode_image(images); model.encode_text(["a photo of a dog"])     # as clus_jax.load gives

    clus_jax.interop.save_open_clip("runs/clip", "runs/clip_open_clip")      # open_clip_config.json + weights
    # in PyTorch: open_clip.create_model_and_transforms("local-dir:runs/clip_open_clip")

A source is a weights file (``.safetensors`` without torch; ``.pt``/``.bin``/``.pth`` with torch) plus an
open_clip model config (a ``model_configs/*.json``, an ``open_clip_config.json`` or a dict), or a folder in
the hub / ``local-dir:`` layout that holds both (``open_clip_config.json`` and a weights file).
"""
from __future__ import annotations

import glob
import json
import os
from collections.abc import Mapping
from typing import Any

import jax
import ml_collections
import numpy as np

from clus_jax.interop import open_clip_config, open_clip_weights

PyTree = Any
ModelConfig = str | os.PathLike | Mapping[str, Any]


def is_source(path: str | os.PathLike) -> bool:
    """Whether ``path`` is open_clip weights (a weights file, or a folder with ``open_clip_config.json``)
    rather than a clus_jax workdir or checkpoint."""
    path = os.fspath(path)
    if os.path.isdir(path):
        return os.path.isfile(os.path.join(path, open_clip_config.CONFIG_FILE))
    return path.endswith(open_clip_weights.WEIGHT_SUFFIXES)


def _weights_file(path: str) -> str:
    if not os.path.isdir(path):
        return path
    preferred = [os.path.join(path, n) for n in (open_clip_weights.WEIGHTS_FILE, "open_clip_pytorch_model.bin",
                                                  "open_clip_pytorch_model.pth", "model.safetensors")]
    found = [p for p in preferred if os.path.isfile(p)]
    found += sorted(p for s in open_clip_weights.WEIGHT_SUFFIXES for p in glob.glob(os.path.join(path, "*" + s)))
    if not found:
        raise FileNotFoundError(f"no open_clip weights file ({', '.join(open_clip_weights.WEIGHT_SUFFIXES)}) in {path!r}")
    return found[0]


def resolve(weights: str | os.PathLike, model_cfg: ModelConfig | None = None) -> tuple[str, dict, dict]:
    """``(weights file, model_cfg, preprocess_cfg)`` of a source; the model config defaults to the folder's."""
    weights = os.fspath(weights)
    if model_cfg is None or model_cfg == "":
        if not os.path.isdir(weights):
            raise ValueError(f"{weights!r} is a weights file: give its open_clip model config too "
                             "(e.g. open_clip's model_configs/ViT-B-32.json)")
        model_cfg = weights
    cfg, preprocess = open_clip_config.read(model_cfg)
    return _weights_file(weights), cfg, preprocess


def read_params(weights: str | os.PathLike, model_cfg: ModelConfig | None = None) -> dict[str, Any]:
    """The clus_jax parameters (float32 NumPy, nested by path) of an open_clip source, every tensor checked
    against the shape its model config gives (ValueError naming the tensor)."""
    from clus_jax.inference import model_shapes
    from clus_jax.common.trees import path_str

    path, cfg, preprocess = resolve(weights, model_cfg)
    config = run_config(cfg, preprocess)
    _, _, shapes = model_shapes(config)
    expected = {path_str(p): x.shape for p, x in jax.tree_util.tree_leaves_with_path(shapes)}
    try:
        return open_clip_weights.to_params(open_clip_weights.read_state_dict(path), cfg, expected)
    except ValueError as e:
        raise ValueError(f"{path!r}: {e}") from None


def run_config(model_cfg: Mapping[str, Any], preprocess_cfg: Mapping[str, Any] | None = None,
               base: ml_collections.ConfigDict | None = None) -> ml_collections.ConfigDict:
    """A clus_jax config (``base`` or the defaults) whose model is the open_clip config's architecture."""
    from clus_jax.config import base as config_base

    config = config_base.base_config() if base is None else base
    open_clip_config.apply(config, model_cfg, preprocess_cfg)
    return config


def load_open_clip(weights: str | os.PathLike, model_cfg: ModelConfig | None = None, *,
                   batch_size: int | None = None):
    """An open_clip checkpoint as the ``Model`` that ``clus_jax.load`` returns (``encode_image``,
    ``encode_text``, ``tokenize``, ``config``, ``params``).

    Args:
      weights: a ``.safetensors`` file (no torch needed), a ``.pt``/``.bin``/``.pth`` file (needs torch), or a
        folder with ``open_clip_config.json`` and a weights file (open_clip's hub / ``local-dir:`` layout).
      model_cfg: the open_clip model config: a path to a ``model_configs/*.json`` or an ``open_clip_config.json``,
        or the same dict; None for a folder's own. Pixel mean and std come from its ``preprocess_cfg`` if it
        has one, else OpenAI's (open_clip's default).
      batch_size: the encoders' batch (``config.evals.batch_size`` when None).
    """
    from clus_jax.inference import model_from_params, model_shapes
    from clus_jax.objectives import teachers

    path, cfg, preprocess = resolve(weights, model_cfg)
    config = run_config(cfg, preprocess)
    params = read_params(path, cfg)
    _, _, shapes = model_shapes(config)
    problems = teachers.shape_mismatches(shapes, params)
    if problems:  # a bug in the mapping rather than in the file: the file's shapes were checked against cfg
        raise ValueError(f"{path!r} does not give clus_jax's model: " + "; ".join(problems[:10]))
    return model_from_params(config, params, checkpoint=path, batch_size=batch_size)


def export_params(params: Mapping[str, Any], config: ml_collections.ConfigDict) -> tuple[dict, dict, dict]:
    """``(state_dict, model_cfg, preprocess_cfg)`` of a clus_jax model's parameters and run config."""
    model_cfg, preprocess = open_clip_config.from_run_config(config)
    params = jax.tree.map(lambda x: np.asarray(x, np.float32), dict(params))
    if "bias" in params["image"]["patch_embed"]:
        params = open_clip_weights.fold_patch_bias(params)
    return open_clip_weights.from_params(params, model_cfg), model_cfg, preprocess


def save_open_clip(workdir: str | os.PathLike, path: str | os.PathLike, step: int | None = None) -> dict[str, str]:
    """Writes a clus_jax run's model as open_clip files in folder ``path``: ``open_clip_model.safetensors``
    (the state dict, float32) and ``open_clip_config.json`` (``model_cfg`` and ``preprocess_cfg``).

    ``open_clip.create_model_and_transforms("local-dir:" + path)`` loads the folder, and so do
    ``load_open_clip(path)`` and ``config.init_from.path = path``. The run's architecture must be one
    open_clip's CLIP expresses (``open_clip_config.from_run_config`` names the key that is not); a patch
    embedding bias is folded into the position embedding (the same function). ``step``: the checkpoint
    (the newest when None). Returns the two files' paths.
    """
    from clus_jax.inference import model_shapes
    from clus_jax.objectives import teachers
    from clus_jax.config.run_config import load_run_config

    config = load_run_config(os.fspath(workdir))
    model_keys = tuple(model_shapes(config)[2])
    params = teachers.load_params(os.fspath(workdir), step, include=model_keys)
    state_dict, model_cfg, preprocess = export_params(params, config)
    os.makedirs(path, exist_ok=True)
    files = {"weights": os.path.join(path, open_clip_weights.WEIGHTS_FILE),
             "config": os.path.join(path, open_clip_config.CONFIG_FILE)}
    open_clip_weights.write_safetensors(files["weights"], state_dict)
    with open(files["config"], "w") as f:
        json.dump({"model_cfg": model_cfg, "preprocess_cfg": preprocess}, f, indent=2)
    return files
