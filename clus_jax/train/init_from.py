"""``config.init_from``: start a run from another run's parameters or an open_clip checkpoint (all or some, on any mesh).

  config.init_from.path     a clus_jax workdir, its ``checkpoints`` folder or one step's folder ('' = off)
  config.init_from.step     which saved step (-1 = the newest)
  config.init_from.include  regex over parameter paths (``image/encoder/block_0/mlp/fc1/kernel``, see
                            ``common.trees.path_str``); '' = every parameter
  config.init_from.exclude  regex of paths not to load ('' = none)
  config.init_from.open_clip_config   with ``path`` an open_clip weights file (``.safetensors``, or ``.pt`` /
                            ``.bin`` / ``.pth`` with torch installed): its open_clip model config (a
                            ``model_configs/*.json`` or ``open_clip_config.json``); '' for a folder in the hub /
                            ``local-dir:`` layout, which holds its own (``clus_jax.interop``)

Selected parameters that the checkpoint holds are loaded; everything else (a parameter the source run
did not have, e.g. a new objective's prototype banks) is initialised fresh. Only parameters are taken,
never the optimizer state, step, objective state or data position. A selected parameter whose saved
shape or dtype differs fails in ``check`` — before anything compiles — naming the parameter; so does, for
an open_clip source, an architecture value of a selected tower that differs from the checkpoint's
(``config.model.image.act`` and the like: same shapes, another function). Loading
happens inside the sharded init (``loader``), so each parameter lands directly in the new run's
sharding, whatever mesh the source run used. A run resuming from its own checkpoints never reads this.
"""
from __future__ import annotations

import logging
import re
from typing import Any, Callable

import jax
import ml_collections
import numpy as np

from clus_jax.objectives import teachers
from clus_jax.common.errors import ConfigError
from clus_jax.parallel.partitioning import is_box
from clus_jax.common.trees import path_str

PyTree = Any
log = logging.getLogger(__name__)


def enabled(config: ml_collections.ConfigDict) -> bool:
    return bool(config.get("init_from") and config.init_from.get("path"))


def _step(config: ml_collections.ConfigDict) -> int | None:
    step = int(config.init_from.get("step", -1))
    return None if step < 0 else step


def _selected(path: str, include: str, exclude: str) -> bool:
    return (not include or re.search(include, path) is not None) and not (exclude and re.search(exclude, path))


def _flat(tree: PyTree) -> dict[str, Any]:
    return {path_str(p): x for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def _open_clip(config: ml_collections.ConfigDict) -> bool:
    from clus_jax.interop import open_clip

    return open_clip.is_source(config.init_from.path)


def _saved_values(config: ml_collections.ConfigDict, top: list[str] | None = None) -> dict[str, Any]:
    """The source's parameters by path (entries ``top`` only, for a clus_jax checkpoint)."""
    cfg = config.init_from
    if _open_clip(config):
        from clus_jax.interop import open_clip

        return _flat(open_clip.read_params(cfg.path, cfg.get("open_clip_config") or None))
    return _flat(teachers.load_params(cfg.path, _step(config), include=top))


def _saved_shapes(config: ml_collections.ConfigDict, wanted: dict[str, Any]) -> dict[str, Any]:
    """Shapes of the source's parameters; for an open_clip source, after checking the selected towers'
    architecture against its model config (ConfigError naming the first key that differs)."""
    cfg = config.init_from
    if not _open_clip(config):
        return _flat(teachers.saved_param_shapes(cfg.path, _step(config)))
    from clus_jax.interop import open_clip, open_clip_config

    _, model_cfg, preprocess_cfg = open_clip.resolve(cfg.path, cfg.get("open_clip_config") or None)
    towers = tuple(t for t in ("image", "text") if any(p.startswith(t + "/") for p in wanted))
    differ = open_clip_config.mismatches(config.model, model_cfg, preprocess_cfg, towers)
    if differ:
        raise ConfigError(f"config.init_from.path={cfg.path!r}: this run's model is not the checkpoint's: "
                          + "; ".join(differ) + " (clus_jax.interop.run_config sets every key)")
    return {p: jax.ShapeDtypeStruct(x.shape, x.dtype) for p, x in _saved_values(config).items()}


def check(config: ml_collections.ConfigDict, abstract_params: PyTree) -> list[str]:
    """Paths of the parameters that will be loaded; ConfigError on a bad source, regex or shape."""
    cfg = config.init_from
    for key in ("include", "exclude"):
        try:
            re.compile(cfg.get(key) or "")
        except re.error as e:
            raise ConfigError(f"config.init_from.{key}={cfg.get(key)!r} is not a valid regex: {e}") from None
    wanted = {p: x for p, x in _flat(teachers.unboxed(abstract_params)).items()
              if _selected(p, cfg.get("include") or "", cfg.get("exclude") or "")}
    if not wanted:
        raise ConfigError(f"config.init_from.include={cfg.include!r} / exclude={cfg.exclude!r} select no parameter")
    try:
        saved = _saved_shapes(config, wanted)
    except (FileNotFoundError, ValueError, ImportError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"config.init_from.path={cfg.path!r}: {e}") from None
    for p, x in wanted.items():
        if p in saved and (tuple(saved[p].shape), np.dtype(saved[p].dtype)) != (tuple(x.shape), np.dtype(x.dtype)):
            raise ConfigError(
                f"config.init_from.path={cfg.path!r}: parameter {p} is saved as {tuple(saved[p].shape)} "
                f"{np.dtype(saved[p].dtype).name} but this run's is {tuple(x.shape)} {np.dtype(x.dtype).name} "
                "(exclude it with config.init_from.exclude)")
    loaded = [p for p in wanted if p in saved]
    if not loaded:
        raise ConfigError(f"config.init_from.path={cfg.path!r} holds none of the selected parameters")
    fresh = [p for p in wanted if p not in saved]
    if fresh:
        log.info("init_from: %d selected parameters are not in %s and start fresh (e.g. %s)", len(fresh), cfg.path, fresh[0])
    return loaded


def loader(config: ml_collections.ConfigDict, paths: list[str]) -> Callable[[PyTree], PyTree]:
    """``load(boxed params) -> boxed params`` with ``paths`` replaced by the saved values (inside jit)."""
    def load(params: PyTree) -> PyTree:
        flat = jax.tree_util.tree_leaves_with_path(params, is_leaf=is_box)
        targets = {path_str(p): leaf for p, leaf in flat if path_str(p) in paths}
        shapes = {p: jax.ShapeDtypeStruct(teachers.unboxed(leaf).shape, teachers.unboxed(leaf).dtype)
                  for p, leaf in targets.items()}

        def read() -> dict[str, np.ndarray]:
            saved = _saved_values(config, sorted({p.split("/")[0] for p in paths}))
            return {p: np.asarray(saved[p], s.dtype) for p, s in shapes.items()}

        values = jax.pure_callback(read, shapes)

        def replace(path, leaf):
            name = path_str(path)
            if name not in values:
                return leaf
            return leaf.replace_boxed(values[name]) if is_box(leaf) else values[name]

        return jax.tree_util.tree_map_with_path(replace, params, is_leaf=is_box)

    return load
