"""Orbax checkpoints of the whole train state plus the data-iterator position.

Saves are asynchronous and keep the last ``keep`` steps. Restore goes into an abstract state that carries
the *target* shardings, so a checkpoint written on one mesh loads on another. A damaged newest checkpoint
is reported in one line and moved aside to ``damaged-<step>`` beside the steps (kept, never deleted; orbax
lists only numbered folders), and the previous good one is used instead of silently starting from scratch:
the next restart does not meet it again, and the run saves that step afresh when it gets there.
"""
from __future__ import annotations

import logging
import os
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from etils import epath

PyTree = Any
log = logging.getLogger(__name__)


DAMAGED_PREFIX = "damaged-"


class CheckpointError(RuntimeError):
    pass


def one_line(e: BaseException, most: int = 200) -> str:
    """``Type: message`` of an exception on one line, cut to ``most`` characters (TensorStore's run long)."""
    text = " ".join(f"{type(e).__name__}: {e}".split())
    return text if len(text) <= most else text[:most - 3] + "..."


def free_path(parent: epath.Path, name: str) -> epath.Path:
    """``parent/name``, or ``name.1``, ``name.2``, ... when it is taken: where to keep something set aside."""
    target, n = parent / name, 0
    while target.exists():
        n += 1
        target = parent / f"{name}.{n}"
    return target


def move_aside(path: epath.Path, parent: epath.Path, name: str) -> epath.Path:
    """Renames ``path`` to ``free_path(parent, name)`` and returns where it went."""
    target = free_path(parent, name)
    path.rename(target)
    return target


def state_shapes(tree: PyTree) -> dict[str, tuple[int, ...]]:
    """A train state's arrays (or their abstract shapes, or a checkpoint's metadata) as orbax names them on
    disk: ``'params.logit_bias' -> shape``."""
    flat = ocp.tree.to_flat_dict(ocp.tree.serialize_tree(tree, keep_empty_nodes=True))
    return {".".join(map(str, k)): tuple(v.shape) for k, v in flat.items() if hasattr(v, "shape")}


def saved_state_shapes(directory: str) -> tuple[int, dict[str, tuple[int, ...]]] | None:
    """``(step, state_shapes)`` of the newest checkpoint in ``directory`` whose metadata reads (no array is
    read), or None when none does: what a new config's state is compared with before anything is written."""
    root = epath.Path(directory)
    steps = sorted((int(p.name) for p in root.iterdir() if p.name.isdigit()), reverse=True) if root.is_dir() else []
    for step in steps:
        try:
            tree = ocp.PyTreeCheckpointHandler().metadata(root / str(step) / "state").tree
        except Exception:  # a damaged step: the restore reports it
            continue
        return step, state_shapes(tree)
    return None


class Checkpointer:
    def __init__(self, directory: str, keep: int = 2, async_save: bool = True):
        self.directory = directory if "://" in directory else os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data"))
        self._last_saved: int | None = None

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: PyTree, data_iterator: Any | None = None, *, force: bool = False) -> bool:
        """Starts an asynchronous save of ``step``; a step already saved by this run is not saved again."""
        if step == self._last_saved or step in self.manager.all_steps():
            return False
        self._last_saved = step
        items = {"state": ocp.args.StandardSave(state)}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

    def restore(self, abstract_state: PyTree, data_iterator: Any | None = None, step: int | None = None) -> tuple[int, PyTree]:
        """Restores ``step`` (default: the newest that loads); returns (step, state).

        A newer step that fails while an older one loads is damaged: reported in one line and moved aside
        (``set_aside_damaged``). When none loads nothing is moved: CheckpointError naming each step's error.
        """
        steps = [step] if step is not None else sorted(self.manager.all_steps(), reverse=True)
        if not steps:
            raise CheckpointError(f"no checkpoint in {self.directory}")
        failed: list[tuple[int, str]] = []
        for candidate in steps:
            items = {"state": ocp.args.StandardRestore(abstract_state)}
            if data_iterator is not None:
                items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
            try:
                restored = self.manager.restore(candidate, args=ocp.args.Composite(**items))
            except Exception as e:  # damaged or incompatible: try the previous one
                failed.append((candidate, one_line(e)))
                continue
            self.set_aside_damaged(failed, candidate)
            return candidate, restored["state"]
        raise CheckpointError(f"no checkpoint could be restored from {self.directory}: "
                              + "; ".join(f"step {s}: {reason}" for s, reason in failed))

    def set_aside_damaged(self, failed: list[tuple[int, str]], restored: int) -> None:
        """Moves each ``(step, reason)`` of ``failed`` to ``damaged-<step>`` (process 0; every process then
        forgets the step), with one warning line each saying why, where it went and which step was used."""
        root = epath.Path(self.directory)
        for bad, reason in failed:
            where = "process 0 moves it aside"
            if jax.process_index() == 0:
                try:
                    where = f"moved it to {move_aside(root / str(bad), root, f'{DAMAGED_PREFIX}{bad}')}"
                except OSError as e:
                    where = f"could not move it aside ({one_line(e)})"
            log.warning("checkpoint step %d in %s could not be restored (%s); %s; resuming from step %d",
                        bad, self.directory, reason, where, restored)
        if failed:
            if jax.process_count() > 1:
                from jax.experimental import multihost_utils

                multihost_utils.sync_global_devices("clus_jax:damaged_checkpoints_moved")
            self.manager.reload()

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
