"""``python -m clus_jax.evaluate WORKDIR [--step S] [--evals NAMES] [--batch-size B] [--no-append]``: re-evaluates a run
(``clus_jax.train.reevaluate``) and prints one JSON line of its metrics."""
from __future__ import annotations

import argparse
import json
from collections.abc import Sequence

from clus_jax.common.errors import ConfigError
from clus_jax.common import cli


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = cli.ArgumentParser(prog="python -m clus_jax.evaluate", allow_abbrev=False, description=__doc__)
    p.add_argument("workdir", help="the run's workdir (holds config.json and checkpoints/)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest finished one)")
    p.add_argument("--evals", default=None,
                   help="entries of config.evals to run, comma-separated, instead of the run's config.evals.run")
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
        lambda: reevaluate(args.workdir, args.step, batch_size=args.batch_size, append=args.append, evals=args.evals),
        input_errors=(FileNotFoundError, ValueError, ConfigError, CheckpointError))
    print(json.dumps({"step": step, **metrics}), flush=True)


if __name__ == "__main__":
    main()
