"""A workdir belongs to its run: a start that would mix another run's checkpoints with this config is refused
before anything is written, and ``--overwrite`` moves the old run aside (to ``replaced-<time>/``) rather than
deleting it.

Another run is one whose checkpoints the new config could not resume as the same model: the objectives'
names differ, ``config.model`` differs (but in the keys that only change how a step is computed), or the saved
train state's arrays differ from the new config's in path or shape (which covers every objective knob,
parameter group and optimizer setting that shapes a parameter or an optimizer state). Everything else (the
objectives' weights, ``total_steps``, learning rates, the mesh) may change between a run's restarts.
"""
from __future__ import annotations

import json
import os
import time
from typing import Any

import jax
import ml_collections
from etils import epath

from clus_jax.common.errors import UsageError
from clus_jax.config.run_config import CONFIG_FILE, read_run_values, run_config_values
from clus_jax.train.checkpoint import free_path, saved_state_shapes, state_shapes

CHECKPOINTS = "checkpoints"
REPLACED_PREFIX = "replaced-"
# config.model keys that change how a step is computed, not the model a checkpoint holds.
RUNTIME_MODEL_KEYS = ("model.dtype", "model.remat", "model.pooled_last_block")
_MOST = 3  # differing arrays named in the error; the rest are counted


def check_writable(workdir: str) -> None:
    """Fails early, with the path in the message, when the workdir (local or gs://) cannot be written."""
    try:
        path = epath.Path(workdir)
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{jax.process_index()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise PermissionError(f"workdir {workdir!r} is not writable ({e.strerror or e})") from None


def has_checkpoints(workdir: str) -> bool:
    """Whether ``<workdir>/checkpoints`` holds a step (a folder named by its number)."""
    folder = epath.Path(workdir) / CHECKPOINTS
    return folder.is_dir() and any(p.name.isdigit() for p in folder.iterdir())


def _flat(values: Any, key: str = "") -> dict[str, Any]:
    if isinstance(values, dict):
        out: dict[str, Any] = {}
        for k, v in values.items():
            out.update(_flat(v, f"{key}.{k}" if key else str(k)))
        return out
    return {key: values}


def _short(value: Any, most: int = 40) -> str:
    text = json.dumps(value)
    return text if len(text) <= most else text[:most - 3] + "..."


def config_differences(saved: dict[str, Any], config: ml_collections.ConfigDict) -> tuple[list[str], list[str]]:
    """``(identity, shaping)``: the keys, with both values, where the run's ``config.json`` values and
    ``config`` differ. identity: the objectives' names and ``model.*`` (but RUNTIME_MODEL_KEYS); shaping: the
    objectives' knobs, ``param_groups`` and ``optim.*``, which matter only where the train state differs."""
    new = run_config_values(config)
    names = (sorted(saved.get("objectives") or {}), sorted(new.get("objectives") or {}))
    identity = [f"objectives ({_short(names[0])} -> {_short(names[1])})"] if names[0] != names[1] else []
    old_flat, new_flat = _flat(saved), _flat(new)
    shaping_roots = {*names[0], *names[1], "param_groups", "optim"}
    shaping = []
    # A key only one side has is not a difference: a run saved before the key existed had its default.
    for key in sorted(set(old_flat) & set(new_flat)):
        if old_flat[key] == new_flat[key]:
            continue
        change = f"{key} ({_short(old_flat[key])} -> {_short(new_flat[key])})"
        if key.startswith("model.") and key not in RUNTIME_MODEL_KEYS:
            identity.append(change)
        elif key.split(".")[0] in shaping_roots:
            shaping.append(change)
    return identity, shaping


def state_differences(saved: dict[str, tuple[int, ...]], new: dict[str, tuple[int, ...]]) -> list[str]:
    """The arrays whose path or shape differ between a saved train state and a new one (parameters first)."""
    out = [f"{k} (not saved)" for k in sorted(set(new) - set(saved))]
    out += [f"{k} (saved, not in this config)" for k in sorted(set(saved) - set(new))]
    out += [f"{k} {list(saved[k])} -> {list(new[k])}" for k in sorted(set(saved) & set(new)) if saved[k] != new[k]]
    return sorted(out, key=lambda d: not d.startswith("params."))


def check_same_run(workdir: str, config: ml_collections.ConfigDict, abstract_state: Any) -> None:
    """Raises UsageError (one line naming what differs) when ``workdir``'s checkpoints are another run's.

    Reads only ``config.json`` and the newest readable checkpoint's metadata; writes nothing.
    """
    identity, shaping, arrays = [], [], []
    path = epath.Path(workdir) / CONFIG_FILE
    if path.exists():
        try:
            identity, shaping = config_differences(read_run_values(path), config)
        except ValueError:
            pass  # an unreadable config.json says nothing; the saved state still does
    saved = saved_state_shapes(str(epath.Path(workdir) / CHECKPOINTS))
    if saved is not None:
        arrays = state_differences(saved[1], state_shapes(abstract_state))
    if not identity and not arrays:
        return
    parts = []
    named = identity + (shaping if arrays else [])
    if named:
        parts.append(f"config.json differs in {', '.join(named)}")
    if arrays:
        more = f" and {len(arrays) - _MOST} more" if len(arrays) > _MOST else ""
        parts.append(f"the checkpoint of step {saved[0]} differs in {', '.join(arrays[:_MOST])}{more}")
    raise UsageError(f"--workdir {workdir} holds another run's checkpoints ({'; '.join(parts)}); pass --overwrite "
                     f"to move that run aside to {os.path.join(workdir, REPLACED_PREFIX)}<time>/, or another --workdir")


def replace_run(workdir: str) -> str | None:
    """``--overwrite``: moves everything in ``workdir`` (but earlier ``replaced-*`` folders) into a new
    ``<workdir>/replaced-<time>/`` on process 0; returns that folder, None where nothing was moved."""
    root = epath.Path(workdir)
    entries = [p for p in root.iterdir() if not p.name.startswith(REPLACED_PREFIX)] if root.is_dir() else []
    target = None
    if entries and jax.process_index() == 0:
        target = free_path(root, f"{REPLACED_PREFIX}{time.strftime('%Y%m%d-%H%M%S')}")
        target.mkdir()
        for entry in entries:
            entry.rename(target / entry.name)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("clus_jax:workdir_replaced")
    return str(target) if target else None
