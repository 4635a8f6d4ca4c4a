"""``config.init_from``: start a run from another run's parameters (all or some, on any mesh).

  config.init_from.path     a clus_jax workdir, its ``checkpoints`` folder or one step's folder ('' = off)
  config.init_from.step     which saved step (-1 = the newest)
  config.init_from.include  regex over parameter paths (``image/encoder/block_0/mlp/fc1/kernel``, see
                            ``optim.path_str``); '' = every parameter
  config.init_from.exclude  regex of paths not to load ('' = none)

Selected parameters that the checkpoint holds are loaded; everything else (a parameter the source run
did not have, e.g. a new objective's prototype banks) is initialised fresh. Only parameters are taken,
never the optimizer state, step, objective state or data position. A selected parameter whose saved
shape or dtype differs fails in ``check`` — before anything compiles — naming the parameter. Loading
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
from clus_jax.objectives.registry import ConfigError
from clus_jax.parallel.partitioning import is_box
from clus_jax.train.optim import path_str

PyTree = Any
log = logging.getLogger(__name__)


def default_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(path="", step=-1, include="", exclude=""))


def enabled(config: ml_collections.ConfigDict) -> bool:
    return bool(config.get("init_from") and config.init_from.get("path"))


def _step(config: ml_collections.ConfigDict) -> int | None:
    step = int(config.init_from.get("step", -1))
    return None if step < 0 else step


def _selected(path: str, include: str, exclude: str) -> bool:
    return (not include or re.search(include, path) is not None) and not (exclude and re.search(exclude, path))


def _flat(tree: PyTree) -> dict[str, Any]:
    return {path_str(p): x for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def check(config: ml_collections.ConfigDict, abstract_params: PyTree) -> list[str]:
    """Paths of the parameters that will be loaded; ConfigError on a bad source, regex or shape."""
    cfg = config.init_from
    for key in ("include", "exclude"):
        try:
            re.compile(cfg.get(key) or "")
        except re.error as e:
            raise ConfigError(f"config.init_from.{key}={cfg.get(key)!r} is not a valid regex: {e}") from None
    try:
        saved = _flat(teachers.saved_param_shapes(cfg.path, _step(config)))
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"config.init_from.path={cfg.path!r}: {e}") from None
    wanted = {p: x for p, x in _flat(teachers.unboxed(abstract_params)).items()
              if _selected(p, cfg.get("include") or "", cfg.get("exclude") or "")}
    if not wanted:
        raise ConfigError(f"config.init_from.include={cfg.include!r} / exclude={cfg.exclude!r} select no parameter")
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
    source, step = config.init_from.path, _step(config)

    def load(params: PyTree) -> PyTree:
        flat = jax.tree_util.tree_leaves_with_path(params, is_leaf=is_box)
        targets = {path_str(p): leaf for p, leaf in flat if path_str(p) in paths}
        shapes = {p: jax.ShapeDtypeStruct(teachers.unboxed(leaf).shape, teachers.unboxed(leaf).dtype)
                  for p, leaf in targets.items()}

        def read() -> dict[str, np.ndarray]:
            top = sorted({p.split("/")[0] for p in paths})
            saved = _flat(teachers.load_params(source, step, include=top))
            return {p: np.asarray(saved[p], s.dtype) for p, s in shapes.items()}

        values = jax.pure_callback(read, shapes)

        def replace(path, leaf):
            name = path_str(path)
            if name not in values:
                return leaf
            return leaf.replace_boxed(values[name]) if is_box(leaf) else values[name]

        return jax.tree_util.tree_map_with_path(replace, params, is_leaf=is_box)

    return load
