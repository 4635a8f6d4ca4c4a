"""Evaluators on any dataset (``clus_jax.data.eval_data`` references), streamed and sharded (``stream``).

``config.evals.<entry> = {'type': <evaluator>, 'data': <ref>, ...}``; every evaluator also takes ``data_dir``
(TFDS), ``image_key``/``label_key``/``caption_key`` (field names; '' = the format's own), ``limit`` (the first
records only; 0 = all) and the registry's ``every``. Metric names (``<entry>`` = the entry's name):

- ``zeroshot``: ``zeroshot/<entry>/top1``, ``top5``, ``mean_per_class_recall`` (CLIP_benchmark's: recall averaged
  over the classes present). The classifier is built from class names x templates (``prompts``, ``classnames``,
  ``templates``: ``clus_jax.data.prompts.resolve``), CLIP style, once per evaluation, a block of classes at a
  time; images are scored batch by batch and only per-class sums are kept.
- ``retrieval``: ``retrieval/<entry>/{i2t,t2i}_r{1,5,10}``, several captions per image (an image is found when
  any of its captions is in the top k). Every process reads the captions; images stream.
- ``fewshot``: ``fewshot/<entry>/<k>shot`` and ``<k>shot_std``: big_vision's few-shot probe, a closed-form ridge
  regression (``metrics.linear_probe_accuracy``) on ``k`` images per class from ``train_data``, for each k of
  ``shots``, mean and standard deviation over ``seeds`` draws; scored on ``data``.
- ``knn``: ``knn/<entry>/top1``: weighted cosine k-NN (``k``, ``temperature``) with ``train_data`` as the memory.
- ``clusters``: ``cluster/<entry>/kmeans_{nmi,ari,purity}`` and one row per objective cluster head
  (``cluster_eval``).

Each also writes ``<kind>/<entry>/decode_errors`` (records that could not be read or decoded, left out of the
figures), ``eval_speed/<entry>/images_per_second`` and ``eval_speed/<entry>/seconds``, and a CLIP_benchmark-style
report (``dataset``, ``task``, ``metrics`` with CLIP_benchmark's metric names where it has the task).
"""
from __future__ import annotations

import numbers
import time
from collections.abc import Sequence

import ml_collections
import numpy as np
from absl import logging

from clus_jax.common.errors import ConfigError
from clus_jax.data import eval_data
from clus_jax.evaluate import cluster_eval, metrics, registry, stream
from clus_jax.evaluate.runner import Evaluation, RETRIEVAL_KS, ZEROSHOT_KS

#: Settings every evaluator of this module takes.
DATA_DEFAULTS = {"data": "", "data_dir": "", "image_key": "", "label_key": "", "caption_key": "", "limit": 0}
#: Classes per block while the zero-shot classifier is built (bounds its text embeddings in memory).
CLASS_BLOCK = 64


def open_data(settings: ml_collections.ConfigDict, key: str = "data", limit_key: str = "limit") -> eval_data.EvalData:
    """The dataset ``settings[key]`` names, with the entry's key and limit settings."""
    return eval_data.open_eval_data(
        settings[key], data_dir=settings.data_dir or None, image_key=settings.image_key or None,
        label_key=settings.label_key or None, caption_key=settings.caption_key or None,
        limit=int(settings[limit_key]) or None)


def _positive_int(settings, key: str, minimum: int = 1) -> None:
    value = settings[key]
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < minimum:
        raise ConfigError(f"config.evals.{settings.entry}.{key}={value!r} must be an integer >= {minimum}")


def _check_ref(settings, key: str) -> None:
    """The reference is well formed and its files exist: a typo fails before training, not at its first eval."""
    try:
        eval_data.check_ref(settings[key], data_dir=settings.data_dir or None)
    except (ValueError, FileNotFoundError) as e:
        raise ConfigError(f"config.evals.{settings.entry}.{key}: {e}") from None


class _Streamed(registry.Evaluator):
    """Shared by the evaluators here: the data settings, their checks, speed metrics and the report."""

    kind = ""  # metric prefix
    task = ""  # CLIP_benchmark's task name
    needs_text = False

    def validate(self, settings: ml_collections.ConfigDict, config: ml_collections.ConfigDict) -> None:
        _check_ref(settings, "data")
        _positive_int(settings, "limit", 0)

    def run(self, settings: ml_collections.ConfigDict, ctx: registry.EvalContext) -> Evaluation:
        if "image" not in ctx.modalities or (self.needs_text and "text" not in ctx.modalities):
            logging.warning("eval %s: skipped, %s needs the towers %s; this run has %s", settings.entry, self.name,
                            ["image", "text"] if self.needs_text else ["image"], list(ctx.modalities))
            return Evaluation(metrics={})
        start = time.perf_counter()
        scores, streamed = self.score(settings, ctx)
        seconds = time.perf_counter() - start
        failed = sum(s.failed for s in streamed)
        speed = sum(s.images for s in streamed) / max(sum(s.seconds for s in streamed), 1e-9)
        prefix = f"{self.kind}/{settings.entry}/"
        out = {prefix + k: float(v) for k, v in scores.items()}
        out[prefix + "decode_errors"] = float(failed)
        out[f"eval_speed/{settings.entry}/images_per_second"] = speed
        out[f"eval_speed/{settings.entry}/seconds"] = seconds
        logging.info("eval %s (%s, %.1fs, %.0f img/s): %s", settings.entry, settings.data, seconds, speed,
                     ", ".join(f"{k}={v:.4f}" for k, v in scores.items()))
        report = {"dataset": settings.data, "task": self.task, "metrics": self.report_metrics(scores),
                  "decode_errors": failed}
        return Evaluation(metrics=out, reports={settings.entry: report})

    def score(self, settings, ctx) -> tuple[dict[str, float], list[stream.Streamed]]:
        """(scores without the metric prefix, what each streamed pass gave: images, failures, seconds)."""
        raise NotImplementedError

    def report_metrics(self, scores: dict[str, float]) -> dict[str, float]:
        return dict(scores)

    @staticmethod
    def stream(data: eval_data.EvalData, ctx: registry.EvalContext, **kw) -> stream.Streamed:
        return stream.stream_images(data, ctx.row_encoder(), int(ctx.batch_size),
                                    int(ctx.config.model.image.image_size), **kw)


def _labelled(labels: np.ndarray, what: str, num_classes: int | None = None) -> np.ndarray:
    """``labels``, refused (ValueError naming ``what``) when a record has none (-1) or, given ``num_classes``, one
    lies outside ``[0, num_classes)``."""
    if (labels < 0).any():
        raise ValueError(f"{what}: {int((labels < 0).sum())} records have no label")
    return labels if num_classes is None else metrics.check_labels(labels, num_classes, what)


def build_classifier(classnames: Sequence[str], templates: Sequence[str], encode_texts) -> np.ndarray:
    """The zero-shot head [C, D]: each class's template texts embedded, normalised, averaged and normalised
    again (``metrics.zeroshot_classifier``), a block of ``CLASS_BLOCK`` classes at a time."""
    rows = []
    for i in range(0, len(classnames), CLASS_BLOCK):
        block = classnames[i:i + CLASS_BLOCK]
        texts = [t.replace("{}", c) for c in block for t in templates]
        embs = np.asarray(encode_texts(texts), np.float32)
        rows.append(metrics.zeroshot_classifier(embs.reshape(len(block), len(templates), -1)))
    return np.concatenate(rows)


@registry.register
class ZeroShot(_Streamed):
    """Zero-shot classification: top-1, top-5 and mean per-class recall, streamed."""

    name = kind = "zeroshot"
    task = "zeroshot_classification"
    needs_text = True
    defaults = {**DATA_DEFAULTS, "prompts": "", "classnames": "", "templates": ""}

    def score(self, settings, ctx):
        from clus_jax.data import prompts

        data = open_data(settings)
        where = f"config.evals.{settings.entry}"
        classnames, templates = prompts.resolve(settings.classnames or None, settings.templates or None,
                                                settings.prompts or None, data.classnames, data.templates, where)
        classifier = build_classifier(classnames, templates, ctx.encode_texts)
        num = len(classnames)
        hits = {k: 0 for k in ZEROSHOT_KS}
        totals = np.zeros(num, np.int64)
        top1 = np.zeros(num, np.int64)

        def on_batch(emb: np.ndarray, labels: np.ndarray) -> None:
            labels = _labelled(labels, f"{where}: labels of {settings.data!r}", num)
            ranks = metrics.zeroshot_ranks(emb, labels, classifier, nonfinite="wrong")
            for k in ZEROSHOT_KS:
                hits[k] += int((ranks < min(k, num)).sum())
            totals[:] += np.bincount(labels, minlength=num)
            top1[:] += np.bincount(labels[ranks == 0], minlength=num)

        got = self.stream(data, ctx, keep=False, on_batch=on_batch)
        n = int(totals.sum())
        if n == 0:
            raise ValueError(f"{where}: no image of {settings.data!r} could be scored ({got.failed} failed to decode)")
        present = totals > 0
        scores = {f"top{k}": hits[k] / n for k in ZEROSHOT_KS}
        scores["mean_per_class_recall"] = float(np.mean(top1[present] / totals[present]))
        return scores, [got]

    def report_metrics(self, scores):
        return {"acc1": scores["top1"], "acc5": scores["top5"], "mean_per_class_recall": scores["mean_per_class_recall"]}


@registry.register
class Retrieval(_Streamed):
    """Image->text and text->image recall@1/5/10 with several captions per image."""

    name = kind = "retrieval"
    task = "zeroshot_retrieval"
    needs_text = True
    defaults = dict(DATA_DEFAULTS)

    def score(self, settings, ctx):
        data = open_data(settings)
        got = self.stream(data, ctx)
        captions: list[str] = []
        owner: list[int] = []
        keep = []
        for row, index in enumerate(got.indices):
            own = data.captions(int(index))
            if own:
                keep.append(row)
                owner += [len(keep) - 1] * len(own)
                captions += own
        if len(keep) < len(got.indices):
            logging.warning("eval %s: %d images of %s have no caption; left out", settings.entry,
                            len(got.indices) - len(keep), settings.data)
        if not captions:
            raise ValueError(f"config.evals.{settings.entry}: {settings.data!r} has no captions to retrieve")
        texts = np.asarray(ctx.encode_texts(captions), np.float32)
        rec = metrics.retrieval_recall(got.embeddings[keep], texts, np.asarray(owner), ks=RETRIEVAL_KS,
                                       nonfinite="wrong")
        return rec, [got]

    def report_metrics(self, scores):
        out = {}
        for k in RETRIEVAL_KS:
            out[f"image_retrieval_recall@{k}"] = scores[f"t2i_r{k}"]
            out[f"text_retrieval_recall@{k}"] = scores[f"i2t_r{k}"]
        return out


class _WithTrain(_Streamed):
    """Evaluators that also read a labelled ``train_data`` (``train_limit``: its first records only)."""

    def validate(self, settings, config):
        super().validate(settings, config)
        _check_ref(settings, "train_data")
        _positive_int(settings, "train_limit", 0)

    def train_and_test(self, settings, ctx, train_indices=None):
        test = open_data(settings)
        test_got = self.stream(test, ctx)
        train = open_data(settings, "train_data", "train_limit")
        train_got = self.stream(train, ctx, indices=train_indices)
        where = f"config.evals.{settings.entry}"
        train_y = _labelled(train_got.labels, f"{where}.train_data ({train.ref!r})")
        test_y = _labelled(test_got.labels, f"{where}.data ({test.ref!r})")
        num = int(max(train_y.max(initial=-1), test_y.max(initial=-1))) + 1
        return train_got.embeddings, train_y, test_got.embeddings, test_y, num, [test_got, train_got]


def fewshot_indices(labels: np.ndarray, shots: int, seed: int) -> np.ndarray:
    """``shots`` record positions per class, drawn with ``seed`` (a class with fewer records gives all of its
    own); for one seed, the draws for fewer shots are the first of those for more, as in big_vision."""
    rng = np.random.default_rng(seed)
    out = []
    for c in np.unique(labels[labels >= 0]):
        mine = np.flatnonzero(labels == c)
        out.append(mine[rng.permutation(len(mine))[:shots]])
    return np.sort(np.concatenate(out)) if out else np.zeros(0, np.int64)


@registry.register
class FewShot(_WithTrain):
    """big_vision's few-shot linear probe: k images per class, several seeds."""

    name = kind = "fewshot"
    task = "fewshot_linear_probe"
    defaults = {**DATA_DEFAULTS, "train_data": "", "train_limit": 0, "shots": (1, 5, 10, 25), "seeds": 3}

    def validate(self, settings, config):
        super().validate(settings, config)
        shots = settings.shots
        if (not isinstance(shots, (list, tuple)) or not shots
                or any(isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1 for k in shots)):
            raise ConfigError(f"config.evals.{settings.entry}.shots={shots!r} must be a list of integers >= 1")
        _positive_int(settings, "seeds")

    def score(self, settings, ctx):
        train = open_data(settings, "train_data", "train_limit")
        labels = np.asarray([-1 if y is None else y for y in map(train.label, range(len(train)))], np.int64)
        draws = {(k, s): fewshot_indices(labels, int(k), s) for k in settings.shots for s in range(int(settings.seeds))}
        needed = np.unique(np.concatenate(list(draws.values())))
        test = open_data(settings)
        test_got = self.stream(test, ctx)
        train_got = self.stream(train, ctx, indices=needed)
        where = f"config.evals.{settings.entry}"
        test_y = _labelled(test_got.labels, f"{where}.data ({test.ref!r})")
        num = int(max(labels.max(initial=-1), test_y.max(initial=-1))) + 1
        row_of = {int(i): r for r, i in enumerate(train_got.indices)}
        scores = {}
        for k in settings.shots:
            accs = []
            for s in range(int(settings.seeds)):
                rows = [row_of[int(i)] for i in draws[(k, s)] if int(i) in row_of]
                accs.append(metrics.linear_probe_accuracy(
                    train_got.embeddings[rows], train_got.labels[rows], test_got.embeddings, test_y, num,
                    seed=s, nonfinite="wrong"))
            scores[f"{k}shot"] = float(np.mean(accs))
            scores[f"{k}shot_std"] = float(np.std(accs))
        return scores, [test_got, train_got]


@registry.register
class Knn(_WithTrain):
    """Weighted cosine k-NN with ``train_data`` as the memory."""

    name = kind = "knn"
    task = "knn_classification"
    defaults = {**DATA_DEFAULTS, "train_data": "", "train_limit": 0, "k": 20, "temperature": 0.07}

    def validate(self, settings, config):
        super().validate(settings, config)
        _positive_int(settings, "k")
        if not isinstance(settings.temperature, numbers.Real) or settings.temperature <= 0:
            raise ConfigError(f"config.evals.{settings.entry}.temperature={settings.temperature!r} must be > 0")

    def score(self, settings, ctx):
        train_x, train_y, test_x, test_y, num, streamed = self.train_and_test(settings, ctx)
        acc = metrics.knn_accuracy(train_x, train_y, test_x, test_y, k=int(settings.k),
                                   temperature=float(settings.temperature), num_classes=num, nonfinite="wrong")
        return {"top1": acc}, streamed

    def report_metrics(self, scores):
        return {"acc1": scores["top1"]}


@registry.register
class Clusters(_Streamed):
    """Cluster quality (NMI, ARI, purity) of the image embeddings of any labelled set."""

    name = "clusters"
    kind = "cluster"
    task = "clustering"
    defaults = dict(DATA_DEFAULTS)

    def score(self, settings, ctx):
        data = open_data(settings)
        got = self.stream(data, ctx)
        labels = _labelled(got.labels, f"config.evals.{settings.entry}.data ({data.ref!r})")
        num = int(labels.max(initial=-1)) + 1
        out = cluster_eval.cluster_metrics(settings.entry, got.embeddings, labels, num, ctx.heads, nonfinite="wrong")
        prefix = f"cluster/{settings.entry}/"
        return {k[len(prefix):]: v for k, v in out.items()}, [got]
