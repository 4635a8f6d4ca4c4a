"""Runs evaluation sets through two encoders and returns flat, stable metric names.

``evaluate(sets, encode_images, encode_texts, heads=None)`` accepts any mix of ``ClassificationSet``,
``RetrievalSet``, ``ProbeSet`` (see ``datasets.py``) and ``ClusterSet`` and returns ``{name: float}`` with these
names (values are fractions in [0, 1]; ``<set>`` is the set's ``name``):

- ``zeroshot/<set>/top1``, ``zeroshot/<set>/top5``: zero-shot classification with the class-name prompts
  (one text per class and template, templates averaged CLIP style);
- ``zeroshot/<set>/mean_per_class_top1``: top-1 recall averaged over the classes present (balanced accuracy);
- ``cluster/<set>/kmeans_{nmi,ari,purity}`` and, with ``heads``, ``cluster/<set>/<head>_{nmi,ari,purity}``
  for every classification set: the set's image embeddings clustered by k-means (k = classes) and by each
  cluster head's arg-max, scored against the labels (``cluster_eval``); a ``ClusterSet`` (a classification
  set of a run without a text tower, from ``sets_for``) gets these names only;
- ``retrieval/<set>/i2t_r1``, ``i2t_r5``, ``i2t_r10``: image->text recall@k (an image is correct when any
  of its captions is in the top k);
- ``retrieval/<set>/t2i_r1``, ``t2i_r5``, ``t2i_r10``: text->image recall@k;
- ``probe/<set>/linear_top1``: closed-form ridge linear probe on frozen image embeddings;
- ``probe/<set>/knn_top1``: weighted cosine k-NN (``knn_k`` neighbours, temperature 0.07).

The encoders belong to the caller, which handles tokenisation, batching, padding and multi-host: each is
called once per array or list with the whole of it. ``encode_images`` gets uint8 ``[n, H, W, 3]``,
``encode_texts`` a ``list[str]``; both return ``[n, D]``. Outputs are L2-normalised again here.

An encoder output row with a NaN or inf is never scored as right. By default (``nonfinite='wrong'``, so one bad
evaluation does not end a training run) it is scored as wrong (``metrics``: a miss at every k, no prediction,
no neighbour; ``cluster_eval``: one extra cluster), logged with its set, and counted in
``Evaluation.nonfinite_embeddings``; ``nonfinite='raise'`` refuses it with a ValueError naming the set and the
count. Labels outside ``[0, classes)`` are a ValueError naming the set.

``run`` returns the same metrics with what the report draws: per classification set, the zero-shot confusion
matrix and per-class accuracy, and a 2-D PCA projection of its image embeddings (``artifacts`` saves them).
"""
from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping, Sequence

import numpy as np
from absl import logging

from clus_jax.evaluate import cluster_eval, metrics
from clus_jax.data.eval_sets import ClassificationSet, ProbeSet, RetrievalSet


@dataclasses.dataclass
class ClusterSet:
    """A classification set scored by cluster quality only: what an image-only run can be scored on there."""

    source: ClassificationSet

    @property
    def name(self) -> str:
        return self.source.name


EvalSet = ClassificationSet | RetrievalSet | ProbeSet | ClusterSet
ImageEncoder = Callable[[np.ndarray], np.ndarray]
TextEncoder = Callable[[list[str]], np.ndarray]

RETRIEVAL_KS = (1, 5, 10)
ZEROSHOT_KS = (1, 5)


@dataclasses.dataclass
class ClassArrays:
    """What one classification set leaves besides its scalars: the zero-shot confusion matrix and a 2-D
    picture of its image embeddings."""

    classnames: list[str]
    confusion: np.ndarray  # int64 [C, C], row = true class, column = zero-shot prediction
    per_class_accuracy: np.ndarray  # float64 [C], NaN for a class without examples
    projection: np.ndarray  # float32 [N, 2], image embeddings on their first two principal axes
    explained_variance: np.ndarray  # float64 [2], variance ratio of each axis
    labels: np.ndarray  # int64 [N]


@dataclasses.dataclass
class Evaluation:
    """What an evaluation gives: flat scalars, and the arrays the report draws (``artifacts`` saves them)."""

    metrics: dict[str, float]
    arrays: dict[str, ClassArrays] = dataclasses.field(default_factory=dict)  # by classification set name
    nonfinite_embeddings: int = 0  # encoder output rows with a NaN or inf, over every set (scored as wrong)
    #: CLIP_benchmark-style results by entry: {'dataset', 'task', 'metrics'} (the command adds 'model').
    reports: dict[str, dict] = dataclasses.field(default_factory=dict)


def metric_names(sets: Sequence[EvalSet], head_names: Sequence[str] = ()) -> list[str]:
    """The keys ``evaluate`` returns for ``sets`` (and cluster heads named ``head_names``), in order."""
    names = []
    for s in sets:
        if isinstance(s, ClassificationSet):
            names += [f"zeroshot/{s.name}/top{k}" for k in ZEROSHOT_KS]
            names += [f"zeroshot/{s.name}/mean_per_class_top1"]
            names += cluster_eval.metric_names(s.name, head_names)
        elif isinstance(s, ClusterSet):
            names += cluster_eval.metric_names(s.name, head_names)
        elif isinstance(s, RetrievalSet):
            names += [f"retrieval/{s.name}/{d}_r{k}" for d in ("i2t", "t2i") for k in RETRIEVAL_KS]
        elif isinstance(s, ProbeSet):
            names += [f"probe/{s.name}/linear_top1", f"probe/{s.name}/knn_top1"]
        else:
            raise TypeError(f"unsupported evaluation set type {type(s).__name__}")
    return names


def sets_for(sets: Sequence[EvalSet], modalities: Sequence[str]) -> list[EvalSet]:
    """The sets a run whose objectives read ``modalities`` can be scored on: zero-shot and retrieval need
    both towers; probes and cluster quality need the image tower only (an image-only run is judged by its
    frozen features: its classification sets become ``ClusterSet``s)."""
    if "image" not in modalities:
        return []
    if "text" in modalities:
        return list(sets)
    return [ClusterSet(s) if isinstance(s, ClassificationSet) else s for s in sets if not isinstance(s, RetrievalSet)]


@dataclasses.dataclass
class _Encoders:
    """The caller's encoders, checked: every output is ``[n, D]``; its non-finite rows are refused naming the
    set (``nonfinite='raise'``) or logged and counted (``'wrong'``: the metrics score them as wrong)."""

    images: ImageEncoder
    texts: TextEncoder
    nonfinite: str
    bad_rows: int = 0

    def __call__(self, kind: str, inputs, set_name: str, part: str = "") -> np.ndarray:
        """``kind`` ('image' or 'text') embeddings of ``inputs``, the ``part`` of set ``set_name`` (for errors)."""
        if len(inputs) == 0:
            raise ValueError(f"set {set_name!r}: no {part or kind + 's'}: an empty set has no score")
        out = np.asarray((self.images if kind == "image" else self.texts)(inputs))
        if out.ndim != 2 or out.shape[0] != len(inputs):
            raise ValueError(f"{kind} encoder returned shape {out.shape} for {len(inputs)} inputs; expected [n, D]")
        ok = metrics.check_finite(out, f"{kind} embeddings", self.nonfinite, where=f"set {set_name!r}: ")
        bad = int(len(ok) - ok.sum())
        if bad:
            logging.warning("eval %s: %d of %d %s embeddings are not finite (NaN or inf); scored as wrong",
                            set_name, bad, len(ok), kind)
            self.bad_rows += bad
        return metrics.l2_normalize(out.astype(np.float32, copy=False))


def _zeroshot(s: ClassificationSet, enc: _Encoders,
              heads: Mapping[str, np.ndarray]) -> tuple[dict[str, float], ClassArrays]:
    bad = [t for t in s.templates if "{}" not in t]
    if bad or not s.templates:
        raise ValueError(f"set {s.name!r}: every template needs a '{{}}' for the class name; got {bad or 'none'}")
    num_classes = len(s.classnames)
    labels = metrics.check_labels(s.labels, num_classes, f"set {s.name!r}: labels")
    texts = [t.replace("{}", c) for c in s.classnames for t in s.templates]
    text_embs = enc("text", texts, s.name)
    classifier = metrics.zeroshot_classifier(text_embs.reshape(num_classes, len(s.templates), -1))
    image_embs = enc("image", s.images, s.name)
    acc = metrics.zeroshot_accuracy(image_embs, labels, classifier, ks=ZEROSHOT_KS, nonfinite=enc.nonfinite)
    # An image without a prediction (non-finite) is in no column of the matrix but counts as a miss of its class.
    predictions = metrics.zeroshot_predictions(image_embs, classifier, nonfinite=enc.nonfinite)
    predicted = predictions >= 0
    confusion = metrics.confusion_matrix(labels[predicted], predictions[predicted], num_classes)
    per_class = metrics.per_class_accuracy(confusion, np.bincount(labels, minlength=num_classes))
    out = {f"zeroshot/{s.name}/top{k}": acc[f"top{k}"] for k in ZEROSHOT_KS}
    out[f"zeroshot/{s.name}/mean_per_class_top1"] = float(np.nanmean(per_class))
    out.update(cluster_eval.cluster_metrics(s.name, image_embs, labels, num_classes, heads, nonfinite=enc.nonfinite))
    projection, explained = metrics.pca_2d(image_embs)
    arrays = ClassArrays(classnames=list(s.classnames), confusion=confusion, per_class_accuracy=per_class,
                         projection=projection.astype(np.float32), explained_variance=explained, labels=labels)
    return out, arrays


def _retrieval(s: RetrievalSet, enc: _Encoders) -> dict[str, float]:
    image_embs = enc("image", s.images, s.name)
    text_embs = enc("text", list(s.captions), s.name, "captions")
    rec = metrics.retrieval_recall(image_embs, text_embs, s.caption_to_image, ks=RETRIEVAL_KS,
                                   nonfinite=enc.nonfinite)
    return {f"retrieval/{s.name}/{key}": value for key, value in rec.items()}


def _probe(s: ProbeSet, enc: _Encoders, knn_k: int) -> dict[str, float]:
    train_labels = metrics.check_labels(s.train_labels, s.num_classes, f"set {s.name!r}: train labels")
    test_labels = metrics.check_labels(s.test_labels, s.num_classes, f"set {s.name!r}: test labels")
    train = enc("image", s.train_images, s.name, "train images")
    test = enc("image", s.test_images, s.name, "test images")
    return {
        f"probe/{s.name}/linear_top1": metrics.linear_probe_accuracy(
            train, train_labels, test, test_labels, s.num_classes, nonfinite=enc.nonfinite),
        f"probe/{s.name}/knn_top1": metrics.knn_accuracy(
            train, train_labels, test, test_labels, k=knn_k, num_classes=s.num_classes, nonfinite=enc.nonfinite),
    }


def evaluate(sets: Sequence[EvalSet], encode_images: ImageEncoder, encode_texts: TextEncoder, *,
             knn_k: int = 20, heads: Mapping[str, np.ndarray] | None = None,
             nonfinite: str = "wrong") -> dict[str, float]:
    """Evaluates every set and returns the flat metrics named in the module docstring."""
    return run(sets, encode_images, encode_texts, knn_k=knn_k, heads=heads, nonfinite=nonfinite).metrics


def run(sets: Sequence[EvalSet], encode_images: ImageEncoder, encode_texts: TextEncoder, *,
        knn_k: int = 20, heads: Mapping[str, np.ndarray] | None = None, nonfinite: str = "wrong") -> Evaluation:
    """Evaluates every set: the metrics of ``evaluate`` and each classification set's ``ClassArrays``.

    ``heads``: the objectives' cluster heads ``{name: [K, D]}`` (``Objective.eval_heads``), in their order.
    ``nonfinite``: ``'wrong'`` or ``'raise'``, for encoder outputs with a NaN or inf (module docstring).
    """
    metrics.check_nonfinite_mode(nonfinite)
    enc = _Encoders(encode_images, encode_texts, nonfinite)
    heads = dict(heads or {})
    names = metric_names(sets, list(heads))
    if len(set(names)) != len(names):
        raise ValueError(f"two evaluation sets of the same kind share a name: {[s.name for s in sets]}")
    results: dict[str, float] = {}
    arrays: dict[str, ClassArrays] = {}
    for s in sets:
        start = time.perf_counter()
        if isinstance(s, ClassificationSet):
            out, arrays[s.name] = _zeroshot(s, enc, heads)
        elif isinstance(s, ClusterSet):
            src = s.source
            out = cluster_eval.cluster_metrics(src.name, enc("image", src.images, src.name), src.labels,
                                               len(src.classnames), heads, nonfinite=nonfinite)
        elif isinstance(s, RetrievalSet):
            out = _retrieval(s, enc)
        else:
            out = _probe(s, enc, knn_k)
        logging.info("eval %s (%.1fs): %s", s.name, time.perf_counter() - start,
                     ", ".join(f"{k.rsplit('/', 1)[-1]}={v:.4f}" for k, v in out.items()))
        results.update(out)
    return Evaluation(metrics={k: float(results[k]) for k in names}, arrays=arrays,
                      nonfinite_embeddings=enc.bad_rows)
