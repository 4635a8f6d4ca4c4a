"""What the commands share for a mistyped command: one readable ``error: ...`` line and exit code 2 (and
exit 1 for an input that cannot be used), and the one JSON summary line a finished command prints.

A user who mistypes a key, a file or an argument gets the name of what is wrong (and the closest key
that exists), never a traceback from inside a flags library.
"""
from __future__ import annotations

import argparse
import difflib
import json
import sys
from collections.abc import Callable, Mapping
from typing import Any, NoReturn

from clus_jax.common.errors import UsageError  # noqa: F401  (commands raise it as cli.UsageError)


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one ``error: ...`` line (exit 2) instead of argparse's usage block."""

    def error(self, message: str) -> NoReturn:
        fail(message)


def format_eta(seconds: float) -> str:
    """A progress line's time left as h:mm:ss, never negative."""
    s = max(int(seconds), 0)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def fail(message: str, code: int = 2) -> NoReturn:
    """Prints ``error: <message>`` (one line) on stderr and exits with ``code``."""
    print(f"error: {' '.join(str(message).split())}", file=sys.stderr, flush=True)
    sys.exit(code)


def run_and_print(run: Callable[[], Any], *, input_errors: tuple[type[BaseException], ...] = ()) -> None:
    """Runs a command's ``run`` and prints its summary as one JSON line; a usage error exits 2 with one
    line, one of ``input_errors`` or an unreadable path exits 1 with one line."""
    try:
        summary = run()
    except UsageError as e:
        fail(str(e))
    except input_errors as e:
        fail(str(e), code=1)
    except (FileNotFoundError, PermissionError) as e:
        fail(f"{type(e).__name__}: {exception_text(e)}", code=1)
    print(json.dumps(summary), flush=True)


def exception_text(e: BaseException) -> str:
    """An exception's message on one line (a KeyError's message without its repr quotes)."""
    text = e.args[0] if isinstance(e, KeyError) and len(e.args) == 1 else str(e)
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    return lines[0] if lines else type(e).__name__


def unknown_key(config: Any, key: str) -> str | None:
    """None when the dotted ``key`` exists in ``config``; else why not, with the closest existing key.

    ``unknown_key(config, 'optim.lrr')`` -> ``"config has no key 'optim.lrr'; did you mean 'optim.lr'?"``
    """
    node, parts = config, key.split(".")
    for i, part in enumerate(parts):
        where = ".".join(parts[:i])
        if isinstance(node, (list, tuple)) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
            continue
        if not isinstance(node, Mapping) and not hasattr(node, "keys"):
            return f"config.{where} is a value ({node!r}), it has no key {part!r}"
        if part not in node:
            close = difflib.get_close_matches(part, [str(k) for k in node.keys()], n=1)
            hint = f"; did you mean {'.'.join([*parts[:i], close[0]])!r}?" if close else \
                f"; {('config.' + where) if where else 'the config'} has {sorted(str(k) for k in node.keys())}"
            return f"config has no key {'.'.join(parts[:i + 1])!r}{hint}"
        node = node[part]
    return None
