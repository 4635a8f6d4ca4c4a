"""Time limits for tests that start processes, scaled by how fast this host is at the start of the run.

A fixed limit set on a fast host fails on a slow or busy one, and a test that fails because of the processor
teaches people to ignore red. Every limit here is a *base* (seconds on the reference host of ``bench/host.py``,
an AVX-512 machine with 2 cores at 200 GFLOP/s, running the suite with two workers) times the host factor: the
reference rate over the XLA float32 matmul rate measured once when the run starts (``tests/conftest.py``), times
2 over the cores the run may use, never below 1 (``bench/host.py``). On a 2-core AVX2 host at 68 GFLOP/s the
factor is about 3; pinned to one core (``taskset -c 0``) about 5.

A real hang still fails: after ``limit(base)`` seconds the process is killed and the test fails with the
process's own output, the last lines of its stdout and stderr.
"""
from __future__ import annotations

import os
import queue
import subprocess
import threading
import time
from typing import Any, Sequence

import pytest

ENV = "CLUS_JAX_TEST_HOST_FACTOR"


def factor() -> float:
    """The run's host factor (set by conftest; 1.0 if a test module is run outside pytest's conftest)."""
    return float(os.environ.get(ENV, "1"))


def limit(base_s: float) -> float:
    """Seconds a step that takes up to ``base_s`` on the reference host may take here."""
    return base_s * factor()


def deadline(base_s: float) -> float:
    """``time.time()`` by which a polled condition must hold, scaled like ``limit``."""
    return time.time() + limit(base_s)


def _tail(text: Any, lines: int = 40) -> str:
    if text is None:
        return ""
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    return "\n".join(text.splitlines()[-lines:])


def timeout_message(cmd: Any, base_s: float, stdout: Any = None, stderr: Any = None) -> str:
    """The failure text of a process that ran past its limit: the limit's derivation and the process's output."""
    return (f"{cmd!r} ran past {limit(base_s):.0f} s (base {base_s:.0f} s x host factor {factor():.2f}) and "
            f"was killed.\n--- its stdout (tail) ---\n{_tail(stdout)}\n--- its stderr (tail) ---\n{_tail(stderr)}")


def run(cmd: Sequence[str], base_s: float, **kwargs: Any) -> subprocess.CompletedProcess:
    """``subprocess.run(cmd, capture_output=True, text=True, **kwargs)`` within ``limit(base_s)``."""
    kwargs.setdefault("capture_output", True)
    kwargs.setdefault("text", True)
    try:
        return subprocess.run(cmd, timeout=limit(base_s), **kwargs)
    except subprocess.TimeoutExpired as e:
        pytest.fail(timeout_message(cmd, base_s, e.stdout, e.stderr), pytrace=False)


def _kill_and_fail(proc: subprocess.Popen, base_s: float) -> None:
    proc.kill()
    out, err = proc.communicate()
    pytest.fail(timeout_message(proc.args, base_s, out, err), pytrace=False)


def wait(proc: subprocess.Popen, base_s: float) -> int:
    """``proc.wait()`` within ``limit(base_s)``; past it the process is killed and the test fails."""
    try:
        return proc.wait(timeout=limit(base_s))
    except subprocess.TimeoutExpired:
        _kill_and_fail(proc, base_s)


class LineReader:
    """Reads a process's stdout on a thread, so waiting for a line is bounded even if the process falls silent."""

    def __init__(self, proc: subprocess.Popen):
        self.proc, self.seen, self._lines = proc, [], queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        for line in self.proc.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def _fail(self, base_s: float) -> None:
        self.proc.kill()
        pytest.fail(timeout_message(self.proc.args, base_s, "".join(self.seen)), pytrace=False)

    def _lines_until(self, base_s: float):
        """Each line as it comes (None at the end), until the limit; past it the process is killed, test failed."""
        end = deadline(base_s)
        while True:
            try:
                yield self._lines.get(timeout=max(0.0, end - time.time()))
            except queue.Empty:
                self._fail(base_s)

    def until(self, prefix: str, base_s: float) -> None:
        """Waits for a line starting with ``prefix``; fails if the process ends first or runs past the limit."""
        for line in self._lines_until(base_s):
            assert line is not None, f"the process ended before printing {prefix!r}:\n" + _tail("".join(self.seen))
            self.seen.append(line)
            if line.startswith(prefix):
                return

    def rest(self, base_s: float) -> str:
        """Everything printed so far and until the process exits, within the limit."""
        for line in self._lines_until(base_s):
            if line is None:
                self.proc.wait()
                return "".join(self.seen)
            self.seen.append(line)
