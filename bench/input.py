"""Input pipeline throughput (decode, augment, tokenise) per worker count, and the data-wait fraction of a
real short training run.

Part 1 pulls batches from ``clus_jax.data.pipeline.create_train_iterator`` on the embedded dataset with
the CLIP tokenizer, for ``num_workers`` in 0, 1, 2, in rounds (0 1 2 0 1 2 ...): each measurement builds
a fresh iterator, discards ``--warmup`` batches (worker start-up, first decode) and times the next
``--batches``. The median images/s per worker count is reported. Worker processes compete with the main
process for the same CPUs, so on a 2-core host more workers need not mean more images/s.

Part 2 runs the trainer (``python -m clus_jax.train``) for a few steps per worker count and reads
``train/data_wait_fraction`` (time spent waiting for the next batch over wall time, per logging window)
from ``<workdir>/metrics.jsonl``; the first window, which contains compilation, is left out.

  python bench/input.py
  python bench/input.py --image-size 96 --batch 128 --workers 0,1,2 --train-steps 60
  python bench/input.py --quick
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workers", default="0,1,2", help="comma-separated worker counts")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--context-length", type=int, default=32)
    p.add_argument("--batches", type=int, default=20, help="timed batches per measurement")
    p.add_argument("--warmup", type=int, default=3, help="batches discarded per measurement")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--train-config", default="configs/clip.py", help="config of the short training run")
    p.add_argument("--train-steps", type=int, default=60)
    p.add_argument("--train-workers", default="0,2", help="worker counts of the training runs ('' to skip)")
    p.add_argument("--quick", action="store_true", help="few batches, one worker count, a 4-step run")
    return p.parse_args()


def pipeline_rate(workers: int, args: argparse.Namespace, tokenizer) -> dict[str, float]:
    """Images/s of one fresh iterator after warm-up; also the seconds to the first batch."""
    from clus_jax.data.data_config import default_data_config
    from clus_jax.data.pipeline import create_train_iterator

    cfg = default_data_config()
    cfg.num_workers = workers
    t0 = time.perf_counter()
    it = create_train_iterator(cfg, tokenizer=tokenizer, image_size=args.image_size, local_batch_size=args.batch,
                               seed=0)
    try:
        next(it)
        first = time.perf_counter() - t0
        for _ in range(args.warmup - 1):
            next(it)
        t1 = time.perf_counter()
        images = 0
        for _ in range(args.batches):
            images += len(next(it)["image"])
        seconds = time.perf_counter() - t1
    finally:
        it.close()
    return dict(images_per_s=images / seconds, first_batch_s=first, seconds=seconds)


def training_run(workers: int, args: argparse.Namespace) -> dict[str, float]:
    """Mean data-wait fraction and images/s of a short run of the trainer, first log window excluded."""
    log_every = max(args.train_steps // 6, 1)
    with tempfile.TemporaryDirectory() as workdir:
        argv = [sys.executable, "-m", "clus_jax.train", "--config", f"{args.train_config}:steps={args.train_steps}",
                "--workdir", workdir, f"--config.log_every={log_every}", "--config.evals.run=none",
                f"--config.data.num_workers={workers}", "--config.checkpoint_every=0",
                f"--config.batch_size={args.batch}", f"--config.model.image.image_size={args.image_size}"]
        t0 = time.perf_counter()
        result = subprocess.run(argv, cwd=common.REPO_ROOT, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if result.returncode:
            raise RuntimeError(f"training run failed:\n{result.stderr[-3000:]}")
        from clus_jax.train.metrics_writer import read_metrics

        records = [r for r in read_metrics(workdir) if "train/data_wait_fraction" in r]
    windows = records[1:] or records
    mean = lambda key: sum(r[key] for r in windows) / len(windows)
    return dict(data_wait_fraction=mean("train/data_wait_fraction"), train_images_per_s=mean("train/images_per_sec"),
                windows=len(windows), wall_s=wall,
                per_window=[round(r["train/data_wait_fraction"], 4) for r in records])


def main() -> None:
    args = parse_args()
    if args.quick:
        args.workers, args.batches, args.warmup, args.rounds = "0", 3, 1, 1
        args.train_steps, args.train_workers, args.batch, args.image_size = 4, "0", 32, 32
    from clus_jax.data.tokenizers import ClipTokenizer

    tokenizer = ClipTokenizer(context_length=args.context_length)
    workers = [int(w) for w in args.workers.split(",") if w != ""]
    samples: dict[int, list[dict[str, float]]] = {w: [] for w in workers}
    for _ in range(args.rounds):
        for w in workers:
            samples[w].append(pipeline_rate(w, args, tokenizer))
    info = dict(host=common.cpu_model(), cpus=os.cpu_count(), date=time.strftime("%Y-%m-%d"))
    rows = []
    for w in workers:
        rates = [s["images_per_s"] for s in samples[w]]
        rows.append(dict(bench="input/pipeline", num_workers=w, batch=args.batch, image_size=args.image_size,
                         context_length=args.context_length, images_per_s=common.median(rates),
                         first_batch_s=common.median([s["first_batch_s"] for s in samples[w]]), rates=rates))
    print(f"Input pipeline, embedded dataset, batch {args.batch}, {args.image_size}px, {args.context_length} tokens, "
          f"{info['host']} ({info['cpus']} CPUs), median of {args.rounds} rounds x {args.batches} batches, {info['date']}")
    common.print_table(rows, [("num_workers", "workers", "d"), ("images_per_s", "img/s", ".0f"),
                              ("first_batch_s", "first batch s", ".2f")])

    train_rows = []
    for w in [int(x) for x in args.train_workers.split(",") if x != ""]:
        train_rows.append(dict(bench="input/train_run", num_workers=w, steps=args.train_steps, batch=args.batch,
                               image_size=args.image_size, config=args.train_config, **training_run(w, args)))
    if train_rows:
        print(f"\nShort training runs ({args.train_config}, {args.train_steps} steps, batch {args.batch}, "
              f"{args.image_size}px): data-wait fraction from metrics.jsonl, first window excluded")
        common.print_table(train_rows, [("num_workers", "workers", "d"), ("data_wait_fraction", "data wait", ".1%"),
                                        ("train_images_per_s", "train img/s", ".0f"), ("wall_s", "wall s", ".0f")])
    for row in rows + train_rows:
        common.emit(dict(info, **row))


if __name__ == "__main__":
    main()
