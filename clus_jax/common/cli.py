"""What the commands share for a user's mistake: one readable ``error: ...`` line, exit code 2 for a mistyped
command and 1 for an input that cannot be used, and the one JSON summary line a finished command prints.

A user who mistypes a key, a file or an argument gets the name of what is wrong (and the closest key
that exists), never a traceback from inside a flags library. A real bug still prints its traceback, and
``CLUS_JAX_DEBUG=1`` prints the traceback of any error (the one line still follows it).
"""
from __future__ import annotations

import argparse
import difflib
import json
import logging
import os
import sys
import traceback
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NoReturn, TypeVar

from clus_jax.common.errors import ConfigError, UsageError

T = TypeVar("T")
DEBUG_ENV = "CLUS_JAX_DEBUG"
# The path errors a user fixes by pointing at another file; anything else unexpected is a bug with a traceback.
PATH_ERRORS = (FileNotFoundError, PermissionError, FileExistsError, IsADirectoryError, NotADirectoryError)


class InputError(RuntimeError):
    """An input a command cannot use (a file cut short, labels of another length, a damaged checkpoint): the
    message names the flag and the file; exit code 1."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one ``error: ...`` line (exit 2) instead of argparse's usage block."""

    def error(self, message: str) -> NoReturn:
        fail(message)


def format_eta(seconds: float) -> str:
    """A progress line's time left as h:mm:ss, never negative."""
    s = max(int(seconds), 0)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def debug() -> bool:
    """Whether ``CLUS_JAX_DEBUG`` asks for the traceback of every error."""
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


def fail(message: str, code: int = 2) -> NoReturn:
    """Prints ``error: <message>`` (one line) on stderr and exits with ``code``."""
    if debug():
        traceback.print_stack(file=sys.stderr)
    _exit(message, code)


def _exit(message: str, code: int) -> NoReturn:
    print(f"error: {' '.join(str(message).split())}", file=sys.stderr, flush=True)
    sys.exit(code)


def _exit_code(e: BaseException, input_errors: tuple[type[BaseException], ...]) -> int | None:
    """2 for a usage mistake, 1 for an unusable input, None for anything else (a bug)."""
    if isinstance(e, UsageError) or (isinstance(e, ConfigError) and ConfigError not in input_errors):
        return 2
    return 1 if isinstance(e, (InputError, *input_errors, *PATH_ERRORS)) else None


def run_command(run: Callable[[], T], *, input_errors: tuple[type[BaseException], ...] = (),
                print_json: bool = False) -> T:
    """Runs a command's body and returns what it returns (printed as one JSON line with ``print_json``).

    A user's mistake ends the command with one ``error: ...`` line: ``UsageError`` and ``ConfigError`` exit 2
    (``ConfigError`` exits 1 where ``input_errors`` names it: a saved run's config); ``InputError``, one of
    ``input_errors`` or a path that cannot be used exits 1 (a path error not named there says its kind:
    ``FileNotFoundError: ...``). Any other exception is a bug and propagates with its traceback;
    ``CLUS_JAX_DEBUG=1`` prints the traceback of a mistake too.
    """
    quiet_failed_restores()
    try:
        result = run()
    except Exception as e:
        code = _exit_code(e, tuple(input_errors))
        if code is None:
            raise
        if debug():
            e.__suppress_context__ = False  # the error a message was made from, too
            traceback.print_exception(e, file=sys.stderr)
        own = isinstance(e, (UsageError, ConfigError, InputError, *input_errors))
        _exit(error_text(e) if own else f"{type(e).__name__}: {error_text(e)}", code)
    if print_json:
        print(json.dumps(result), flush=True)
    return result


def _not_unawaited_future(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("Future exception was never retrieved")


def quiet_failed_restores() -> None:
    """Keeps a failed orbax restore (a damaged checkpoint) to its own error. The reads of its other arrays fail
    too, after orbax closed its event loop: tensorstore reports each as an unraisable ``RuntimeError: Event loop
    is closed`` (a traceback per array) and asyncio logs each as 'Future exception was never retrieved'. Both are
    dropped, the restore's own error says what failed; any other exception goes where it went."""
    logging.getLogger("asyncio").addFilter(_not_unawaited_future)  # once: a filter is not added twice
    previous = sys.unraisablehook
    if getattr(previous, "quiets_failed_restores", False):
        return

    def hook(unraisable: Any) -> None:
        e = unraisable.exc_value
        if not (isinstance(e, RuntimeError) and str(e) == "Event loop is closed"):
            previous(unraisable)

    hook.quiets_failed_restores = True  # type: ignore[attr-defined]
    sys.unraisablehook = hook


def error_text(e: BaseException) -> str:
    """An exception's whole message (a KeyError's without its repr quotes), without a tensorstore error's dump
    of its spec."""
    text = str(e.args[0] if isinstance(e, KeyError) and len(e.args) == 1 else e)
    return text.split(" [tensorstore_spec=")[0]


def check_out_dir(flag: str, path: str) -> None:
    """Raises ``UsageError`` when an output directory argument names something that is not a directory."""
    if "://" not in path and os.path.lexists(path) and not os.path.isdir(path):
        raise UsageError(f"{flag} {path} exists and is not a directory; pass a directory")


def check_overrides(config: Any, args: Sequence[str]) -> None:
    """Raises ``UsageError`` naming the first ``--config.KEY[=VALUE]`` of ``args`` whose key ``config`` lacks."""
    for arg in args:
        if arg == "--":
            return
        if arg.startswith(("--config.", "-config.")):
            problem = unknown_key(config, arg.split("config.", 1)[1].partition("=")[0])
            if problem:
                raise UsageError(f"{arg}: {problem}")


def exception_text(e: BaseException) -> str:
    """The first line of an exception's message (``error_text``), for a message that wraps it."""
    lines = [line.strip() for line in error_text(e).splitlines() if line.strip()]
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
