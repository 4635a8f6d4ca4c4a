"""Orbax checkpoints of the whole train state plus the data-iterator position.

Saves are asynchronous and keep the last ``keep`` steps. Restore goes into an abstract state that carries
the *target* shardings, so a checkpoint written on one mesh loads on another. A damaged latest checkpoint
is reported and the previous good one is used instead of silently starting from scratch.
"""
from __future__ import annotations

import logging
import os
from typing import Any

import grain
import orbax.checkpoint as ocp

PyTree = Any
log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    pass


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
        """Restores ``step`` (default: the newest that loads); returns (step, state)."""
        steps = [step] if step is not None else sorted(self.manager.all_steps(), reverse=True)
        if not steps:
            raise CheckpointError(f"no checkpoint in {self.directory}")
        errors = []
        for candidate in steps:
            items = {"state": ocp.args.StandardRestore(abstract_state)}
            if data_iterator is not None:
                items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
            try:
                restored = self.manager.restore(candidate, args=ocp.args.Composite(**items))
            except Exception as e:  # damaged or incompatible: say what, then try the previous one
                message = f"checkpoint step {candidate} in {self.directory} could not be restored: {type(e).__name__}: {str(e)[:300]}"
                log.warning(message)
                errors.append(message)
                continue
            if errors:
                log.warning("resumed from older checkpoint step %d after: %s", candidate, "; ".join(errors))
            return candidate, restored["state"]
        raise CheckpointError("no checkpoint could be restored:\n" + "\n".join(errors))

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
