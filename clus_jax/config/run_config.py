"""``<workdir>/config.json``: the full config of a run, written when it starts and read back to use it.

The file is the plain JSON of the ConfigDict (readable, ``jq .optim.lr``), with every objective's knobs
``config.<name>.*`` filled in from its defaults, so it says everything the run did. Field references are
stored as their values. JSON has no tuples: arrays come back as tuples, which every reader of a config
accepts and which stay hashable (logical-axis rules, bank sizes), so a loaded config builds the same model,
shardings and train state as the one that was saved.
"""
from __future__ import annotations

import json
import numbers
import os
from typing import Any

import ml_collections
import numpy as np
from etils import epath

from clus_jax.common.files import atomic_write_json

CONFIG_FILE = "config.json"


def _plain(value: Any, key: str) -> Any:
    """``value`` as JSON-ready Python (numpy scalars and arrays become numbers and lists)."""
    if isinstance(value, dict):
        return {str(k): _plain(v, f"{key}.{k}" if key else str(k)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v, f"{key}.{i}") for i, v in enumerate(value)]
    if isinstance(value, np.ndarray):
        return _plain(value.tolist(), key)
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, (str, bool, numbers.Number)):
        return value
    raise TypeError(f"config.{key} = {value!r} ({type(value).__name__}) cannot be written to {CONFIG_FILE}")


def run_config_values(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """What ``config.json`` holds for ``config``, as read back (lists, not tuples): every objective in
    ``config.objectives`` with all its knobs (its defaults filled in). A value JSON cannot hold names its key."""
    from clus_jax.config.base import objective_knobs

    values = config.to_dict()
    values.update(objective_knobs(dict(config.get("objectives") or {}), values))
    return json.loads(json.dumps(_plain(values, "")))


def save_run_config(workdir: str, config: ml_collections.ConfigDict) -> str:
    """Writes ``<workdir>/config.json`` atomically (local or gs://, replacing an older one); returns its path."""
    plain = run_config_values(config)  # before anything is written
    directory = epath.Path(workdir)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / CONFIG_FILE
    atomic_write_json(path, plain, indent=2)
    return str(path)


def _tuples(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _tuples(v) for k, v in value.items()}
    if isinstance(value, list):
        return tuple(_tuples(v) for v in value)
    return value


def run_config_path(workdir_or_checkpoint: str) -> epath.Path:
    """Where the config.json of a workdir, its ``checkpoints`` folder or one step's folder is.

    Raises FileNotFoundError naming the path when there is none.
    """
    path = epath.Path(os.path.expanduser(str(workdir_or_checkpoint)))
    candidates = [path]
    # <workdir>/checkpoints/<step>/state -> <workdir>: climb only through a checkpoint layout.
    for name_matches in (lambda n: n == "state", str.isdigit, lambda n: n == "checkpoints"):
        if name_matches(path.name):
            path = path.parent
            candidates.append(path)
    for candidate in candidates:
        if (candidate / CONFIG_FILE).exists():
            return candidate / CONFIG_FILE
    raise FileNotFoundError(f"no {CONFIG_FILE} for {str(workdir_or_checkpoint)!r} (looked in "
                            f"{', '.join(repr(str(c)) for c in candidates)})")


def load_run_config(workdir_or_checkpoint: str) -> ml_collections.ConfigDict:
    """The config a run was trained with, from its workdir, ``checkpoints`` folder or one step's folder."""
    return ml_collections.ConfigDict(_tuples(read_run_values(run_config_path(workdir_or_checkpoint))))


def read_run_values(path: str | os.PathLike) -> dict[str, Any]:
    """The values of the config.json at ``path`` as plain JSON (lists), in today's form (``_upgrade``).

    Raises ValueError naming the file when it is not a JSON object.
    """
    path = epath.Path(path)
    try:
        values = json.loads(path.read_text())
    except ValueError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(values, dict):
        raise ValueError(f"{path} holds {type(values).__name__}, expected a JSON object")
    return _upgrade(values)


def _upgrade(values: dict[str, Any]) -> dict[str, Any]:
    """A config.json written before evaluators had names (``evals.sets``: 'embedded' or 'none') in today's
    form (``evals.run`` over named entries), so older runs still load and re-evaluate."""
    evals = values.get("evals")
    if isinstance(evals, dict) and "sets" in evals and "run" not in evals:
        evals = {k: v for k, v in evals.items() if k != "sets"}
        evals["run"] = "none" if values["evals"]["sets"] == "none" else "embedded"
        evals.setdefault("embedded", {"type": "embedded"})
        values = {**values, "evals": evals}
    return values
