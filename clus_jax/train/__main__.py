"""CLI: python -m clus_jax.train --config configs/NAME.py[:ARG] --workdir DIR [--overwrite] [--config.KEY=VALUE ...]"""
from __future__ import annotations

import json
import logging
from typing import Any, Sequence

import ml_collections
from absl import app, flags
from ml_collections import config_flags

from clus_jax.common import cli
from clus_jax.common import hostmem
from clus_jax.train.checkpoint import CheckpointError

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file (optionally :ARG).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics.jsonl and TensorBoard.")
_OVERWRITE = flags.DEFINE_bool(
    "overwrite", False, "Start over in a --workdir that holds a run: move everything it holds aside to "
    "<workdir>/replaced-<time>/ (nothing is deleted). Without it a workdir holding another run's checkpoints is refused.")
flags.mark_flags_as_required(["config", "workdir"])
_HELP = ("-h", "--help", "-help", "--helpshort", "-helpshort", "-?", "--helpfull", "-helpfull")


class _LoadedConfigParser(flags.ArgumentParser):
    """``--config``'s parser: hands over the config ``check_config_args`` loaded (so the file runs once),
    else loads the file with ml_collections' own parser."""

    def __init__(self, file_parser: flags.ArgumentParser):
        self.file_parser = file_parser
        self.loaded: dict[str, ml_collections.ConfigDict] = {}

    def parse(self, path: str) -> Any:
        if path not in self.loaded:
            return self.file_parser.parse(path)
        config = self.loaded.pop(path)
        config.lock()  # what lock_config=True does to the config a file gives
        return config

    def flag_type(self) -> str:
        return self.file_parser.flag_type()


_CONFIG_PARSER = _LoadedConfigParser(flags.FLAGS["config"].parser)
flags.FLAGS["config"].parser = _CONFIG_PARSER


def _config_spec(args: Sequence[str]) -> str | None:
    """The value of ``--config`` (either ``--config X`` or ``--config=X``) in ``args``."""
    for i, arg in enumerate(args):
        if arg == "--":
            break
        for name in ("--config", "-config"):
            if arg.startswith(name + "="):
                return arg[len(name) + 1:]
            if arg == name and i + 1 < len(args):
                return args[i + 1]
    return None


def check_config_args(args: Sequence[str]) -> ml_collections.ConfigDict | None:
    """Loads the ``--config`` file and checks that every ``--config.KEY`` override names a key it has;
    returns the loaded config (None without ``--config``).

    Raises ``cli.UsageError`` with one line naming the file, the argument or the key (and the closest
    existing key) instead of the traceback ml_collections would print while absl parses the flags.
    """
    spec = _config_spec(args)
    if spec is None:
        return None  # absl reports the missing flag
    from clus_jax.config import base as config_base

    try:
        config = config_base.load_config(spec)
    except (FileNotFoundError, KeyError, ValueError, SyntaxError) as e:
        raise cli.UsageError(f"--config {spec}: {cli.exception_text(e)}") from None
    for arg in args:
        if arg == "--":
            break
        if arg.startswith(("--config.", "-config.")):
            key = arg.split("config.", 1)[1].partition("=")[0]
            problem = cli.unknown_key(config, key)
            if problem:
                raise cli.UsageError(f"{arg}: {problem}")
    return config


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with a mistyped command reported as one ``error: ...`` line (exit code 2) and
    ``--help`` printed with exit code 0 (absl's exits 1). The config file is loaded once, here."""
    if any(arg in _HELP for arg in argv[1:argv.index("--") if "--" in argv else None]):
        app.usage(shorthelp=not any("helpfull" in arg for arg in argv[1:]), writeto_stdout=True, exitcode=0)
    try:
        spec, config = _config_spec(argv[1:]), check_config_args(argv[1:])
        if config is not None:
            _CONFIG_PARSER.loaded[spec] = config
        return flags.FLAGS(argv)
    except cli.UsageError as e:
        cli.fail(str(e))
    except (flags.Error, KeyError, AttributeError, ValueError, OSError) as e:
        cli.fail(cli.exception_text(e))


def main(argv):
    del argv
    hostmem.retain_freed_memory()  # before jax starts its threads; CLUS_JAX_HOST_MALLOC=system opts out
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("absl", "jax._src", "orbax", "grain"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from clus_jax.parallel.distributed import maybe_initialize

    maybe_initialize()
    from clus_jax.train.loop import NonFiniteError, train_and_evaluate

    # Problems a user can fix get one readable line, not a stack trace from inside a library.
    final = cli.run_command(lambda: train_and_evaluate(_CONFIG.value, _WORKDIR.value, overwrite=_OVERWRITE.value),
                            input_errors=(CheckpointError, NonFiniteError))
    summary = {k: round(v, 4) for k, v in final.items() if k.startswith(("zeroshot/", "retrieval/", "probe/"))}
    if summary:
        print("final evaluation:")
        for k, v in sorted(summary.items()):
            print(f"  {k:45s} {v:.4f}")
    print(json.dumps({"final_train_loss": final.get("train/loss"), **summary}))


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
