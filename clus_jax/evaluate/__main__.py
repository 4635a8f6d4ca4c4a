"""``python -m clus_jax.evaluate SOURCE [--evals NAMES | --evals SUITE.py[:ARG]] [--out DIR] [--step S]
[--model-config CFG] [--batch-size B] [--no-append]``: evaluates a run's checkpoint or an open_clip checkpoint
(``clus_jax.train.reevaluate``) and prints one JSON line of its metrics.

SOURCE is a run's workdir, or an open_clip checkpoint (a folder with ``open_clip_config.json``, or a weights file
with ``--model-config``; ``--out`` required). ``--evals`` names entries of the run's ``config.evals``, or one suite
file (``configs/evals/``) whose entries run; every entry writes ``benchmarks/<entry>.json`` with
CLIP_benchmark's keys. Without ``--out`` the files go to ``<workdir>/eval/step_<S>/`` and the metrics to
``<workdir>/metrics.jsonl``."""
from __future__ import annotations

import argparse
import json
from collections.abc import Sequence

from clus_jax.common.errors import ConfigError
from clus_jax.common import cli


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = cli.ArgumentParser(prog="python -m clus_jax.evaluate", allow_abbrev=False, description=__doc__)
    p.add_argument("source", metavar="SOURCE",
                   help="a run's workdir (holds config.json and checkpoints/), or an open_clip checkpoint")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest finished one)")
    p.add_argument("--evals", default=None,
                   help="entries of config.evals to run, comma-separated, instead of the run's config.evals.run; "
                        "or a suite file PATH.py[:ARG] whose get_config(ARG) gives the entries")
    p.add_argument("--out", default=None,
                   help="a new or empty folder for the evaluation's files, instead of the run's workdir "
                        "(metrics.jsonl is left alone); required for an open_clip checkpoint")
    p.add_argument("--model-config", default=None,
                   help="the open_clip model config (JSON) of an open_clip weights file")
    p.add_argument("--batch-size", type=int, default=None, help="encoder batch (default: config.evals.batch_size)")
    p.add_argument("--no-append", dest="append", action="store_false",
                   help="do not append the metrics to <workdir>/metrics.jsonl (the arrays are still written)")
    args = p.parse_args(argv)
    if args.batch_size is not None and args.batch_size < 1:
        cli.fail(f"--batch-size={args.batch_size} must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    from clus_jax.train.checkpoint import CheckpointError
    from clus_jax.train.reevaluate import reevaluate

    step, metrics = cli.run_command(
        lambda: reevaluate(args.source, args.step, batch_size=args.batch_size, append=args.append, evals=args.evals,
                           out=args.out, model_config=args.model_config),
        input_errors=(FileNotFoundError, ValueError, ConfigError, CheckpointError))
    print(json.dumps({"step": step, **metrics}), flush=True)


if __name__ == "__main__":
    main()
