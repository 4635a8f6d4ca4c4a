"""Metrics to ``<workdir>/metrics.jsonl`` (one JSON object per event, with ``step``) and TensorBoard."""
from __future__ import annotations

import json
import math
from typing import Mapping

import jax
from etils import epath


class MetricWriter:
    """Writes on process 0 only; other processes get a no-op writer. Paths may be local or gs://."""

    def __init__(self, workdir: str, tensorboard: bool = True):
        self.active = jax.process_index() == 0
        self.path = epath.Path(workdir) / "metrics.jsonl"
        self._tb = None
        if self.active:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if tensorboard:
                from tensorboardX import SummaryWriter

                self._tb = SummaryWriter(str(epath.Path(workdir) / "tensorboard"))

    def write(self, step: int, metrics: Mapping[str, float]) -> None:
        if not self.active:
            return
        clean = {k: (float(v) if isinstance(v, (int, float)) or hasattr(v, "item") else v) for k, v in metrics.items()}
        record = {"step": int(step), **{k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in clean.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for k, v in clean.items():
                if isinstance(v, float) and math.isfinite(v):
                    self._tb.add_scalar(k, v, int(step))
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_metrics(workdir: str) -> list[dict]:
    with (epath.Path(workdir) / "metrics.jsonl").open() as f:
        return [json.loads(line) for line in f if line.strip()]
