"""The resumable state of a k-means run and its orbax checkpoints.

State = centres (split over the centre axes), the pass's partial sums and counts (per data shard), the
iteration, the next chunk of the pass, the inertia summed so far, the previous pass's inertia (for ``tol``)
and whether ``tol`` has stopped the run. A checkpoint also records a fingerprint of the clustering (k, D,
N, metric, chunk size, seed, iterations); resuming a different clustering from the same directory fails
with a message instead of mixing the two. ``CenterCheckpoints`` is the same for balanced k-means, whose
state is the centres at an iteration end.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from clus_jax.clustering import blocked as blocked

_STEP_PER_ITERATION = 1_000_000_000  # checkpoint step = iteration * this + chunk (ordered by progress)


def _manager(directory: str | None) -> ocp.CheckpointManager | None:
    """A synchronous manager of ('arrays', 'meta') items keeping 2 saves, or None without a directory."""
    if not directory:
        return None
    options = ocp.CheckpointManagerOptions(max_to_keep=2, create=True, enable_async_checkpointing=False)
    return ocp.CheckpointManager(os.path.abspath(os.fspath(directory)), options=options,
                                 item_names=("arrays", "meta"))


def _newest_meta(manager: ocp.CheckpointManager | None, fingerprint: dict[str, Any]) -> tuple[int | None, dict]:
    """(step, meta) of the newest save, (None, {}) when there is none; a save of another clustering fails."""
    if manager is None or manager.latest_step() is None:
        return None, {}
    step = manager.latest_step()
    meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    if meta["fingerprint"] != fingerprint:
        raise ValueError(f"checkpoint_dir {manager.directory} holds a different clustering "
                         f"{meta['fingerprint']}; this one is {fingerprint} (use another directory)")
    return step, meta


@dataclasses.dataclass
class KMeansState:
    centers: jax.Array
    center_sq: jax.Array
    sums: jax.Array
    counts: jax.Array
    iteration: int
    chunk: int
    inertia_sum: float
    previous_inertia: float
    done: bool


class KMeansCheckpoints:
    """Saves and restores ``KMeansState`` under ``directory`` (no-op when ``directory`` is None)."""

    def __init__(self, directory: str | None, layout: blocked.Layout, dim: int, fingerprint: dict[str, Any]):
        self.layout, self.dim, self.fingerprint = layout, dim, {k: v for k, v in fingerprint.items()}
        self.manager = _manager(directory)

    def save(self, state: KMeansState) -> None:
        if self.manager is None:
            return
        arrays = {"centers": state.centers, "sums": state.sums, "counts": state.counts}
        meta = {"iteration": state.iteration, "chunk": state.chunk, "inertia_sum": state.inertia_sum,
                "previous_inertia": None if state.previous_inertia != state.previous_inertia else state.previous_inertia,
                "done": state.done, "fingerprint": self.fingerprint}
        step = state.iteration * _STEP_PER_ITERATION + state.chunk
        self.manager.save(step, args=ocp.args.Composite(arrays=ocp.args.StandardSave(arrays),
                                                        meta=ocp.args.JsonSave(meta)), force=True)
        self.manager.wait_until_finished()

    def restore(self) -> KMeansState | None:
        step, meta = _newest_meta(self.manager, self.fingerprint)
        if step is None:
            return None
        layout = self.layout
        ctr = layout.sharding(layout.centers_spec())
        acc = layout.sharding(layout.accumulator_spec())
        abstract = {
            "centers": jax.ShapeDtypeStruct((layout.padded_k, self.dim), "float32", sharding=ctr),
            "sums": jax.ShapeDtypeStruct((layout.point_shards, layout.padded_k, self.dim), "float32", sharding=acc),
            "counts": jax.ShapeDtypeStruct((layout.point_shards, layout.padded_k), "int32", sharding=acc),
        }
        arrays = self.manager.restore(step, args=ocp.args.Composite(arrays=ocp.args.StandardRestore(abstract)))["arrays"]
        center_sq = jax.jit(blocked.center_sqnorms, out_shardings=ctr)(arrays["centers"])
        previous = meta["previous_inertia"]
        return KMeansState(arrays["centers"], center_sq, arrays["sums"], arrays["counts"], int(meta["iteration"]),
                           int(meta["chunk"]), float(meta["inertia_sum"]),
                           float("nan") if previous is None else float(previous), bool(meta["done"]))


class CenterCheckpoints:
    """Per-iteration checkpoints of host-side centres (balanced k-means holds its points in memory and
    checkpoints at iteration ends only): [k, D] centres, the iteration and the previous inertia."""

    def __init__(self, directory: str | None, fingerprint: dict[str, Any]):
        self.fingerprint = dict(fingerprint)
        self.manager = _manager(directory)

    def save(self, centers: np.ndarray, iteration: int, previous_inertia: float, done: bool) -> None:
        if self.manager is None:
            return
        meta = {"iteration": iteration, "done": done, "fingerprint": self.fingerprint,
                "previous_inertia": None if previous_inertia != previous_inertia else previous_inertia}
        self.manager.save(iteration, args=ocp.args.Composite(arrays=ocp.args.StandardSave({"centers": centers}),
                                                             meta=ocp.args.JsonSave(meta)), force=True)
        self.manager.wait_until_finished()

    def restore(self) -> tuple[np.ndarray, int, float, bool] | None:
        """(centres, iteration, previous inertia, done) of the newest save, or None."""
        step, meta = _newest_meta(self.manager, self.fingerprint)
        if step is None:
            return None
        arrays = self.manager.restore(step, args=ocp.args.Composite(arrays=ocp.args.StandardRestore()))["arrays"]
        previous = meta["previous_inertia"]
        return (np.asarray(arrays["centers"], np.float32), int(meta["iteration"]),
                float("nan") if previous is None else float(previous), bool(meta["done"]))
