"""CLI: python -m clus_jax.train --config configs/NAME.py[:ARG] --workdir DIR [--config.KEY=VALUE ...]"""
from __future__ import annotations

import json
import logging
import sys

from absl import app, flags
from ml_collections import config_flags

from clus_jax import hostmem
from clus_jax.objectives.registry import ConfigError
from clus_jax.train.checkpoint import CheckpointError

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file (optionally :ARG).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics.jsonl and TensorBoard.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    hostmem.retain_freed_memory()  # before jax starts its threads; CLUS_JAX_HOST_MALLOC=system opts out
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("absl", "jax._src", "orbax", "grain"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from clus_jax.parallel.distributed import maybe_initialize

    maybe_initialize()
    from clus_jax.train.loop import NonFiniteError, train_and_evaluate

    try:
        final = train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except (CheckpointError, FileNotFoundError, PermissionError, NonFiniteError) as e:
        # Problems a user can fix get one readable line, not a stack trace from inside a library.
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        sys.exit(1)
    summary = {k: round(v, 4) for k, v in final.items() if k.startswith(("zeroshot/", "retrieval/", "probe/"))}
    if summary:
        print("final evaluation:")
        for k, v in sorted(summary.items()):
            print(f"  {k:45s} {v:.4f}")
    print(json.dumps({"final_train_loss": final.get("train/loss"), **summary}))


if __name__ == "__main__":
    app.run(main)
