"""``<workdir>/metrics.jsonl`` (one JSON object per event, with ``step``) and TensorBoard: written by
``MetricWriter``, read by ``read_metrics``, the one reader of the file (report, sweep, benchmarks, tests).

A killed writer or a full disk can cut the file's last line. The writer sets a cut last line aside (to
``metrics.jsonl.partial``, appended) before it appends, so the next record starts on a fresh line; the reader
skips a malformed line with a one-line warning naming the file and the line, and keeps every complete record.
"""
from __future__ import annotations

import json
import logging
import math
import os
from typing import Mapping

from etils import epath

from clus_jax.common import files

METRICS_FILE = "metrics.jsonl"
PARTIAL_SUFFIX = ".partial"  # a cut last line set aside, beside the metrics file: never read, never lost
log = logging.getLogger(__name__)


class MetricWriter:
    """Writes on process 0 only; other processes get a no-op writer. Paths may be local or gs://."""

    def __init__(self, workdir: str, tensorboard: bool = True):
        import jax  # here, so that the reader imports no jax

        self.active = jax.process_index() == 0
        self.path = epath.Path(workdir) / METRICS_FILE
        self._tb = None
        if self.active:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            set_aside_cut_line(self.path)
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


def _record(line: str) -> dict | None:
    """The record on ``line`` (a JSON object with an integer ``step``), or None when the line holds anything else."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    ok = isinstance(record, dict) and isinstance(record.get("step"), int) and not isinstance(record["step"], bool)
    return record if ok else None


def _parse(line: str) -> tuple[int, dict | None]:
    """(where the record on ``line`` starts, the record): 0 on a well-formed line; after the cut text where an
    older writer appended the record onto a cut line; ``len(line)`` and None on a line that holds no record."""
    record = _record(line)
    if record is not None:
        return 0, record
    start = line.rfind('{"step": ')  # how MetricWriter begins every record
    record = _record(line[start:]) if start > 0 else None
    return (start, record) if record is not None else (len(line), None)


def set_aside_cut_line(path: epath.Path) -> None:
    """Before appending to ``path``: a last line cut short (no newline, or not a record) moves to
    ``path.partial`` (appended), so that the next record starts on a fresh line and no byte is lost. A complete
    record stays: one that only lacks its newline gets it, one appended onto cut text keeps its own line."""
    if not path.exists():
        return
    data = path.read_bytes()
    body = data[:-1] if data.endswith(b"\n") else data
    last = body.rsplit(b"\n", 1)[-1]
    start = _parse(last.decode("latin-1"))[0] if last.strip() else 0  # latin-1: one character per byte
    if start == 0:
        if data and not data.endswith(b"\n"):
            with path.open("ab") as f:
                f.write(b"\n")
        return
    side = path.parent / (path.name + PARTIAL_SUFFIX)
    with side.open("ab") as f:  # first, so that a crash in between leaves the cut text in both files
        f.write(last[:start] + b"\n")
    kept = last[start:] + b"\n" if start < len(last) else b""
    files.atomic_write_bytes(path, body[:len(body) - len(last)] + kept)
    log.warning("%s: its last line was cut short (a killed writer or a full disk?); the cut text moved to %s, "
                "appending on a fresh line", path, side)


def read_metrics(workdir: str | os.PathLike) -> list[dict]:
    """Every record of ``<workdir>/metrics.jsonl``, in order. A malformed line is skipped with a warning that
    names the file and the line; a record that an older writer appended onto a cut line is kept."""
    path = epath.Path(workdir) / METRICS_FILE
    records = []
    for number, line in enumerate(path.read_bytes().decode("utf-8", "replace").split("\n"), 1):
        if not line.strip():
            continue
        start, record = _parse(line)
        if start:
            what = f"kept the record at column {start + 1}, skipped" if record is not None else "skipped"
            log.warning("%s:%d: %s a malformed line (cut short by a killed writer or a full disk?): %.60r",
                        path, number, what, line)
        if record is not None:
            records.append(record)
    return records
