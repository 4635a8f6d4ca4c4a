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
  config.init_from.mode     'params' (the default): parameters only, a fresh optimizer and schedule;
                            'resume': a clus_jax run's parameters, optimizer state and step (below)

Selected parameters that the checkpoint holds are loaded; everything else (a parameter the source run
did not have, e.g. a new objective's prototype banks) is initialised fresh. In mode 'params' only
parameters are taken, never the optimizer state, step, objective state or data position.

Mode 'resume' (MetaCLIP's ``quick_init``, how MoDE's experts continue their seed) also restores the
source's optimizer state (Adam moments and counts, every parameter group's) and its step, so the
learning-rate schedule goes on from the source's position: the run trains from the source's step S to
its own ``total_steps``, and its schedule is its own config's evaluated from S on. To continue the
source's schedule, give the run the source's optimizer settings and schedule length: a seed that stops at
S of a T-step schedule runs ``total_steps=S, optim.schedule_steps=T``, its continuation ``total_steps=T``.
A schedule that differs from the source's over S..total_steps is reported in one warning line. Every
parameter is selected (include / exclude are refused), the optimizer state must have the source's arrays
(the same optimizer and parameter groups, else one error line), ``total_steps`` must exceed S, and the
objective states, random key and data position start fresh. One log line names the checkpoint, its step
and what was restored. A selected parameter whose saved
shape or dtype differs fails in ``check`` — before anything compiles — naming the parameter; so does, for
an open_clip source, an architecture value of a selected tower that differs from the checkpoint's
(``config.model.image.act`` and the like: same shapes, another function). Loading
happens inside the sharded init (``loader``), so each parameter lands directly in the new run's
sharding, whatever mesh the source run used; mode 'resume' then restores the step and optimizer state the
same way (orbax, into the run's shardings). A run resuming from its own checkpoints never reads this.
"""
from __future__ import annotations

import logging
import re
from typing import Any, Callable

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from clus_jax.objectives import teachers
from clus_jax.common.errors import ConfigError
from clus_jax.config.run_config import load_run_config
from clus_jax.parallel.partitioning import is_box
from clus_jax.common.trees import path_str
from clus_jax.train import optim

PyTree = Any
log = logging.getLogger(__name__)


def enabled(config: ml_collections.ConfigDict) -> bool:
    return bool(config.get("init_from") and config.init_from.get("path"))


def resuming(config: ml_collections.ConfigDict) -> bool:
    """Whether the run starts from the source's parameters, optimizer state and step (mode 'resume')."""
    return enabled(config) and config.init_from.get("mode", "params") == "resume"


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


#: The train-state entries mode 'resume' restores besides the parameters (``loader`` loads those).
RESUMED = ("step", "opt_state")


def _arrays(tree: PyTree) -> dict[str, tuple[tuple[int, ...], str]]:
    """A train state's arrays, abstract arrays or saved metadata by their orbax names: name -> (shape, dtype)."""
    flat = ocp.tree.to_flat_dict(ocp.tree.serialize_tree(tree, keep_empty_nodes=True))
    return {".".join(map(str, k)): (tuple(v.shape), np.dtype(v.dtype).name)
            for k, v in flat.items() if hasattr(v, "shape")}


def _optimizer_differences(saved: PyTree, abstract_state: PyTree) -> list[str]:
    """The step and optimizer arrays whose name, shape or dtype differ between a saved state and this run's."""
    old, new = _arrays({k: saved[k] for k in RESUMED if k in saved}), _arrays({k: abstract_state[k] for k in RESUMED})
    out = [f"{k} (not saved)" for k in sorted(set(new) - set(old))]
    out += [f"{k} (saved, not in this run)" for k in sorted(set(old) - set(new))]
    return out + [f"{k} saved {old[k]}, this run {new[k]}" for k in sorted(set(old) & set(new)) if old[k] != new[k]]


def _schedule_warning(config: ml_collections.ConfigDict, step: int, schedule: Callable) -> str | None:
    """One line when this run's learning rate over ``step..total_steps`` is not the source run's schedule
    (from its config.json; None without one)."""
    try:
        source = load_run_config(config.init_from.path)
    except (FileNotFoundError, ValueError):
        return None
    theirs = optim.learning_rate_schedule(source.optim, int(source.total_steps))
    steps = np.arange(step, int(config.total_steps) + 1)
    ours, seed = np.asarray(jax.vmap(schedule)(steps)), np.asarray(jax.vmap(theirs)(steps))
    if np.array_equal(ours, seed):
        return None
    at = int(steps[np.argmax(ours != seed)])
    return (f"init_from: this run's learning-rate schedule is not the one of {config.init_from.path} (config.optim "
            f"or total_steps differ): at step {at} it is {ours[at - step]:.4g}, the source's {seed[at - step]:.4g}")


def resume_restorer(config: ml_collections.ConfigDict, abstract_state: PyTree,
                    schedule: Callable) -> Callable[[PyTree], PyTree]:
    """``restore(fresh state) -> state`` with the source checkpoint's step and optimizer state (mode 'resume';
    its parameters come through ``loader``). Checks now, before anything compiles: ConfigError for an
    open_clip source, an optimizer state that is not this run's, or a ``total_steps`` not past the source's step."""
    cfg = config.init_from
    if _open_clip(config):
        raise ConfigError(f"config.init_from.path={cfg.path!r} is an open_clip checkpoint, which holds no "
                          "optimizer state: config.init_from.mode='resume' needs a clus_jax run (mode 'params' "
                          "loads the weights)")
    directory = epath.Path(teachers.resolve_checkpoint(cfg.path, _step(config)))
    step = int(directory.parent.name)  # <run>/checkpoints/<step>/state
    differ = _optimizer_differences(ocp.PyTreeCheckpointHandler().metadata(directory).tree, abstract_state)
    if differ:
        raise ConfigError(f"config.init_from.path={cfg.path!r}: the optimizer state of step {step} is not this run's "
                          f"({len(differ)} arrays differ, e.g. {differ[0]}): another optimizer or other parameter "
                          "groups; config.init_from.mode='params' loads the parameters alone")
    if int(config.total_steps) <= step:
        raise ConfigError(f"config.total_steps={config.total_steps} must exceed the step {step} of "
                          f"config.init_from.path={cfg.path!r}: mode 'resume' trains from that step to total_steps")
    warning = _schedule_warning(config, step, schedule)
    if warning:
        log.warning("%s", warning)
    target = {k: abstract_state[k] for k in RESUMED}

    def restore(state: PyTree) -> PyTree:
        args = ocp.args.PyTreeRestore(item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                                      partial_restore=True)
        with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as checkpointer:
            restored = checkpointer.restore(directory, args=args)
        log.info("init_from: resumed %s at step %d: parameters, optimizer state (Adam moments and counts) and step "
                 "restored; learning rate %.4g at step %d, training to total_steps %d", directory.parent, step,
                 float(schedule(step)), step, int(config.total_steps))
        return {**state, **restored}

    return restore
