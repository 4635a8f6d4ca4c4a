"""python -m clus_jax.embed: embeds every record of a data source with a trained model, into shards on disk.

    python -m clus_jax.embed --workdir RUN --out DIR [--data.KEY=VALUE ...] [--modality image,text]
        [--batch-size N] [--step S] [--shard-size N] [--process-index P --process-count N] [--workers N]
    python -m clus_jax.embed --workdir OPEN_CLIP [--model-config CFG] --out DIR [...]
    python -m clus_jax.embed --encoder minilm --out DIR [--workdir RUN] [--data.KEY=VALUE ...] [...]

The data source is the run's own training data (``data`` of ``RUN/config.json``) unless ``--data.*``
overrides change it (``--data.source=array_record --data.path='shards-*.array_record'``). Records are read
by random access (``data.sources.make_source``); images get the evaluation's preparation
(``inference.eval_image``), captions the evaluation's cleaning and the run's tokenizer, both encoders are
``clus_jax.load``'s, so a row equals ``model.encode_image`` / ``encode_text`` of the same input.

``--workdir`` may instead name an open_clip checkpoint (``interop.open_clip.is_source``: a folder with
``open_clip_config.json``, or a weights file with ``--model-config``), loaded by ``interop.load_open_clip``
into the same encoders: an off-the-shelf CLIP as the embedder, as MLCD clusters with one. It has no training
data of its own, so the data starts from ``config.base``'s default (the embedded dataset), as ``--data.*``
changes it.

``--encoder minilm`` embeds the captions with all-MiniLM-L6-v2 (``models.minilm``, sentence-transformers'
values, 384 wide) instead of a run's text tower: MoDE's caption encoder, which needs no trained run. Only
the text modality is embedded; ``--workdir`` is then optional and only says whose data config to start
from (without it, ``config.base``'s default data: the embedded dataset).

Output: a side file (``clus_jax/data/side_fields.py`` writes and reads it, manifest included) of the fields
``image_emb`` / ``text_emb`` float32 [D], ``index`` int64 and ``valid`` bool, and beside it
``DIR/embed.json``: what was embedded (run, step, data config, modalities, shard size, fields).

``index`` holds each row's record index (in the full source when the source is a subset); a record whose
image cannot be decoded or whose caption is missing gets zero rows and ``valid`` False. Shards have a fixed
size; process P of N embeds its own contiguous run of shards, so the processes write disjoint ranges that
together cover every record. A re-run skips the shards that are complete; the side file's manifest is
written once every shard is (by whichever process completes the last one). A progress line (records done /
total, rate, ETA) goes to stderr and a JSON summary to stdout. A ``DIR`` that holds embeddings of something
else is refused before the weights are read. A mistyped command exits with one ``error: ...`` line (code 2), a
run or data path that cannot be used with one such line and code 1.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import os
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from etils import epath

from clus_jax.common import cli
from clus_jax.common.files import claim_directory
from clus_jax.data.fields import FieldSpec
from clus_jax.data.side_fields import INDEX_FIELD, VALID_FIELD, SideFileWriter, field_entries, process_shards

MODALITIES = ("image", "text")
EMBEDDING_FIELDS = {"image": "image_emb", "text": "text_emb"}
SPEC_FILE = "embed.json"
DEFAULT_SHARD_SIZE = 8192
ENCODERS = ("run", "minilm")
MINILM_BATCH_SIZE = 256


class CaptionEncoder:
    """all-MiniLM-L6-v2 with the part of ``inference.Model``'s interface that embedding captions uses."""

    step = None
    image_size = 0  # no image is read: captions only

    def __init__(self, batch_size: int | None = None):
        from clus_jax.models import minilm

        self._encoder = minilm.load_encoder()
        self.batch_size = int(batch_size or MINILM_BATCH_SIZE)

    @property
    def embed_dim(self) -> int:
        return self._encoder.embed_dim

    def encode_text(self, texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.embed_dim), np.float32)
        return self._encoder.encode_captions(list(texts), self.batch_size)


def parse_args(argv: Sequence[str] | None = None) -> tuple[argparse.Namespace, list[tuple[str, str]]]:
    """(arguments, ``--data.KEY=VALUE`` overrides as (key, text) in order); exits 2 on a mistyped command."""
    p = cli.ArgumentParser(prog="python -m clus_jax.embed", allow_abbrev=False,
                           description="Embeds every record of a data source with a trained clus_jax model.")
    p.add_argument("--workdir", default=None,
                   help="the run: a workdir, its checkpoints folder or one step's folder, or an open_clip checkpoint "
                        "(optional with --encoder minilm)")
    p.add_argument("--model-config", default=None, help="the open_clip model config (JSON) of an open_clip weights file")
    p.add_argument("--encoder", choices=ENCODERS, default="run",
                   help="run: the run's own towers (default); minilm: all-MiniLM-L6-v2 captions (text only)")
    p.add_argument("--out", required=True, help="output directory (side-file format)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest)")
    p.add_argument("--modality", default=None,
                   help="comma-separated: image, text or both (default: both; text with --encoder minilm)")
    p.add_argument("--batch-size", type=int, default=None, help="encoder batch (default: config.evals.batch_size)")
    p.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE, help="records per output shard")
    p.add_argument("--process-index", type=int, default=0, help="this process (0-based) of --process-count")
    p.add_argument("--process-count", type=int, default=1, help="number of processes sharing the work")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="threads reading records")
    args, rest = p.parse_known_args(argv)
    if args.encoder == "run" and not args.workdir:
        cli.fail("--workdir is required (the run whose towers embed the data), unless --encoder minilm")
    if args.modality is None:
        args.modality = "text" if args.encoder == "minilm" else "image,text"
    overrides, i = [], 0
    while i < len(rest):
        arg = rest[i]
        if not arg.startswith("--data."):
            cli.fail(f"unrecognized argument {arg!r} (data config overrides are --data.KEY=VALUE)")
        key, eq, value = arg[len("--data."):].partition("=")
        if not eq:
            if i + 1 >= len(rest):
                cli.fail(f"{arg} needs a value (--data.{key}=VALUE)")
            value, i = rest[i + 1], i + 1
        overrides.append((key, value))
        i += 1
    modalities = [m.strip() for m in args.modality.split(",") if m.strip()]
    bad = [m for m in modalities if m not in MODALITIES]
    if bad or not modalities:
        cli.fail(f"--modality={args.modality!r}: expected a comma-separated list of {', '.join(MODALITIES)}")
    args.modality = tuple(m for m in MODALITIES if m in modalities)
    if args.encoder == "minilm" and args.modality != ("text",):
        cli.fail(f"--encoder minilm embeds captions only; --modality={','.join(args.modality)} asks for images")
    for name in ("batch_size", "shard_size", "process_count", "workers"):
        value = getattr(args, name)
        if value is not None and value < 1:
            cli.fail(f"--{name.replace('_', '-')}={value} must be at least 1")
    if not 0 <= args.process_index < args.process_count:
        cli.fail(f"--process-index={args.process_index} must be in [0, --process-count={args.process_count})")
    return args, overrides


def data_config_with(data_config: Any, overrides: Sequence[tuple[str, str]]):
    """The run's data config with ``--data.KEY=VALUE`` overrides, typed like the values they replace, resolved.

    Raises ``cli.UsageError`` naming the key for unknown keys and unparsable or invalid values.
    """
    from clus_jax.config.base import parse_value
    from clus_jax.data.data_config import resolve_data_config

    try:
        data = resolve_data_config(data_config)
    except ValueError as e:
        raise cli.UsageError(f"the run's data config: {cli.exception_text(e)}") from None
    for key, text in overrides:
        problem = cli.unknown_key(data, key)
        if problem:
            raise cli.UsageError(f"--data.{key}: {problem.replace('config has', 'the data config has')}")
        try:
            data[key] = parse_value(text, data[key])
        except (TypeError, ValueError) as e:
            raise cli.UsageError(f"--data.{key}={text}: {cli.exception_text(e)}") from None
    try:
        return resolve_data_config(data)
    except ValueError as e:
        raise cli.UsageError(cli.exception_text(e)) from None


class _Progress:
    """Prints 'embed: done/total records, rate, ETA' to stderr, at most every ``every`` seconds."""

    def __init__(self, total: int, done: int, every: float = 5.0):
        self.total, self.done, self.every = total, done, every
        self.t0 = self.last = time.time()
        self.start_done = done

    def update(self, n: int, *, force: bool = False) -> None:
        self.done += n
        now = time.time()
        if not force and now - self.last < self.every:
            return
        self.last = now
        rate = (self.done - self.start_done) / max(now - self.t0, 1e-9)
        left = (self.total - self.done) / rate if rate > 0 else 0.0
        pct = 100.0 * self.done / max(self.total, 1)
        print(f"embed: {self.done}/{self.total} records ({pct:.0f}%)  {rate:.1f} records/s  eta {cli.format_eta(left)}",
              file=sys.stderr, flush=True)


def _read_record(source: Any, index: int, image_size: int,
                 modalities: tuple[str, ...]) -> tuple[np.ndarray | None, str | None] | None:
    """(image, caption) of one record prepared as the evaluation prepares them; None when it is invalid.

    Only the modalities asked for are read: an image-only run does not need captions.
    """
    from clus_jax.data import transforms
    from clus_jax.inference import eval_image

    try:
        record = source[index]
    except Exception as e:  # a damaged record is an invalid row, never the end of the job
        print(f"warning: record {index} could not be read: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        return None
    if not isinstance(record, Mapping):
        return None
    image = caption = None
    if "text" in modalities:
        caption = transforms.clean_caption(record.get("caption"))
        if caption is None:
            return None
    if "image" in modalities:
        try:
            image = eval_image(record.get("image"), image_size)
        except transforms.InvalidRecord:
            return None
    return image, caption


def embed_range(model: Any, source: Any, start: int, end: int, modalities: tuple[str, ...], batch_size: int,
                pool: concurrent.futures.Executor, progress: _Progress | None = None) -> dict[str, np.ndarray]:
    """Rows of every field for records [start, end) of ``source``: embeddings, ``index`` and ``valid``."""
    n, dim = end - start, model.embed_dim
    original = getattr(source, "original_index", None)
    out = {EMBEDDING_FIELDS[m]: np.zeros((n, dim), np.float32) for m in modalities}
    out[INDEX_FIELD] = np.asarray([original(i) if original else i for i in range(start, end)], np.int64)
    out[VALID_FIELD] = np.zeros((n,), bool)
    for lo in range(start, end, batch_size):
        hi = min(lo + batch_size, end)
        read = list(pool.map(lambda i: _read_record(source, i, model.image_size, modalities), range(lo, hi)))
        rows = [j for j, r in enumerate(read) if r is not None]
        at = np.asarray(rows, np.int64) + (lo - start)
        if "image" in modalities:
            out["image_emb"][at] = model.encode_image(np.stack([read[j][0] for j in rows]) if rows else [])
        if "text" in modalities:
            out["text_emb"][at] = model.encode_text([read[j][1] for j in rows])
        out[VALID_FIELD][at] = True
        if progress is not None:
            progress.update(hi - lo)
    return out


def _open_clip_source(args: argparse.Namespace) -> bool:
    """Whether ``--workdir`` is an open_clip checkpoint; a flag that does not go with what it is is refused."""
    from clus_jax.interop.open_clip import is_source

    foreign = args.encoder == "run" and is_source(args.workdir)
    if args.model_config is not None and not foreign:
        raise cli.UsageError(f"--model-config {args.model_config}: only for an open_clip checkpoint in --workdir, "
                             f"and {args.workdir} is not one")
    if foreign and args.step is not None:
        raise cli.UsageError(f"--step {args.step}: {args.workdir} is an open_clip checkpoint, which has no steps")
    if foreign and args.model_config is None and not os.path.isdir(args.workdir):
        raise cli.UsageError(f"--model-config: {args.workdir} is an open_clip weights file; pass its model config "
                             "(e.g. open_clip's model_configs/ViT-B-32.json)")
    return foreign


def run(args: argparse.Namespace, overrides: Sequence[tuple[str, str]]) -> dict[str, Any]:
    """Embeds this process's shards of the records into ``args.out``; returns the summary."""
    from clus_jax.data.sources import make_source
    from clus_jax.inference import load
    from clus_jax.config.run_config import load_run_config

    cli.check_out_dir("--out", args.out)
    foreign = _open_clip_source(args)
    if foreign or not args.workdir:
        from clus_jax.config.base import base_config

        data = data_config_with(base_config().data, overrides)
    else:
        data = data_config_with(load_run_config(args.workdir).data, overrides)
    try:
        source = make_source(data)
    except ValueError as e:
        raise cli.UsageError(cli.exception_text(e)) from None
    num_records = len(source)
    out = epath.Path(args.out)
    workdir = args.workdir and (os.path.abspath(args.workdir) if "://" not in args.workdir else args.workdir)
    spec = {"workdir": workdir, "data": data.to_dict(), "modality": list(args.modality),
            "shard_size": int(args.shard_size), "num_records": num_records}
    if args.encoder != "run" or foreign:  # an embedding made before --encoder existed still matches its embed.json
        spec["encoder"] = "open_clip" if foreign else args.encoder
    if args.model_config:
        spec["model_config"] = os.path.abspath(args.model_config)
    # What is known before the weights are read: another embedding in --out is refused before the model loads.
    claim_directory(out, SPEC_FILE, spec, "embeddings of something else", partial=True)
    if args.encoder == "minilm":
        model = CaptionEncoder(args.batch_size)
    elif foreign:
        from clus_jax.interop.open_clip import load_open_clip

        try:
            model = load_open_clip(args.workdir, args.model_config, batch_size=args.batch_size)
        except (OSError, ValueError) as e:  # a missing, cut or mismatched weights file
            raise cli.InputError(f"--workdir {args.workdir}: {cli.exception_text(e)}") from None
    else:
        try:
            model = load(args.workdir, args.step, batch_size=args.batch_size)
        except ValueError as e:  # a checkpoint cut short or of another model
            raise cli.InputError(f"--workdir {args.workdir}: {cli.exception_text(e)}") from None
    specs = {EMBEDDING_FIELDS[m]: FieldSpec((model.embed_dim,), "float32") for m in args.modality}
    specs[INDEX_FIELD] = FieldSpec((), "int64")
    specs[VALID_FIELD] = FieldSpec((), "bool")

    writer = SideFileWriter(out, specs, shard_size=int(args.shard_size), num_records=num_records)
    ranges = writer.ranges
    mine = process_shards(len(ranges), args.process_index, args.process_count)
    claim_directory(out, SPEC_FILE, {**spec, "step": model.step, "fields": field_entries(specs)},
                    "embeddings of something else")

    todo = [k for k in mine if not writer.has_shard(k)]
    total = sum(ranges[k][1] - ranges[k][0] for k in mine)
    progress = _Progress(total, total - sum(ranges[k][1] - ranges[k][0] for k in todo))
    if len(todo) < len(mine):
        print(f"embed: {len(mine) - len(todo)} of {len(mine)} shards already complete, skipped",
              file=sys.stderr, flush=True)
    batch_size = int(args.batch_size or (model.batch_size if args.encoder == "minilm" else model.config.evals.batch_size))
    with concurrent.futures.ThreadPoolExecutor(int(args.workers)) as pool:
        for k in todo:
            start, end = ranges[k]
            writer.write_shard(k, embed_range(model, source, start, end, args.modality, batch_size, pool, progress))
    progress.update(0, force=True)
    complete = writer.close()
    invalid = sum(int((~writer.read_shard(k, VALID_FIELD)).sum()) for k in mine)
    return {"out": os.fspath(out), "process": args.process_index, "processes": args.process_count,
            "records": total, "embedded": sum(ranges[k][1] - ranges[k][0] for k in todo),
            "skipped_shards": len(mine) - len(todo), "invalid": invalid, "num_records": num_records,
            "complete": complete}


def main(argv: Sequence[str] | None = None) -> None:
    args, overrides = parse_args(argv)
    cli.run_command(lambda: run(args, overrides), print_json=True)


if __name__ == "__main__":
    main()
