"""Which curve figures a report draws and what goes in each panel, from the metric names alone: no objective
or evaluator is named here, so whatever a run logged is drawn.

A metric's family is its first path component. ``train`` is split: ``loss.png`` (``train/loss`` and each
``train/<objective>/loss``), ``learning_rate.png``, ``logit_scale.png``, ``train.png`` (every other
``train/<metric>``), and ``objective_<objective>.png`` per objective that logged more than its loss (one panel
per ``train/<objective>/<metric...>``, a row per sub-path such as a head or a bank; a distribution logged as its
quantiles, ``<name>/min``, ``/pNN``, ``/max``, one panel of lines, and ``histograms`` one histogram figure per
run and path, drawn by ``plots.histogram``). Every other family gets
``eval_<family>.png``: the known evaluation families in a layout of their own (retrieval R@k as lines of a
panel, few-shot k-shot accuracies as lines of a panel per entry, cluster scores per scoring head, evaluation speed
one line per entry, every family's ``<entry>/decode_errors`` one panel with a line per entry), any other family one
panel per metric. Entries that run on their own schedules (``every``) are lines over their own steps.
"""
from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Sequence

#: A panel: its title and its lines, (metric key, label of the line within the panel).
Panel = tuple[str, list[tuple[str, str]]]

#: The known evaluation families, in page order, with their titles.
EVAL_FAMILIES = {"zeroshot": "Zero-shot classification", "retrieval": "Retrieval recall",
                 "fewshot": "Few-shot linear probes", "knn": "k-NN classification",
                 "probe": "Frozen-feature probes", "cluster": "Cluster quality", "eval_speed": "Evaluation speed"}
#: Step-level training metrics drawn alone, with their titles.
SINGLE_FIGURES = {"learning_rate": "Learning rate", "logit_scale": "Logit scale (1 / temperature)"}

_ZEROSHOT_ORDER = ["top1", "top5", "mean_per_class_top1", "mean_per_class_recall"]
_EVAL_PANELS = {
    # family: (regex, panel title, line label, sort key of the lines)
    "zeroshot": (r"^zeroshot/(?P<set>[^/]+)/(?P<var>.+)$", "{set}", "{var}",
                 lambda m: (_ZEROSHOT_ORDER + [m["var"]]).index(m["var"])),
    "retrieval": (r"^retrieval/(?P<set>[^/]+)/(?P<dir>i2t|t2i)_r(?P<k>\d+)$", "{set} {dir}", "R@{k}",
                  lambda m: int(m["k"])),
    # fewshot/<set>/<k>shot and <k>shot_std: a panel of the accuracies and one of their spread over the draws.
    "fewshot": (r"^fewshot/(?P<set>[^/]+)/(?P<k>\d+)shot(?P<std>(_std)?)$", "{set}{std}", "{k}-shot",
                lambda m: int(m["k"])),
    "knn": (r"^knn/(?P<set>[^/]+)/(?P<var>.+)$", "{set}", "{var}",
            lambda m: (["top1", "top5"] + [m["var"]]).index(m["var"])),
    "probe": (r"^probe/(?P<set>[^/]+)/(?P<var>.+)$", "{set}", "{var}",
              lambda m: (["linear_top1", "knn_top1"] + [m["var"]]).index(m["var"])),
    # cluster/<set>/<head>_<score>: k-means first, then the scoring heads by the number in their name.
    "cluster": (r"^cluster/(?P<set>[^/]+)/(?P<head>.+)_(?P<score>nmi|ari|purity)$", "{set} {score}", "{head}",
                lambda m: (-1, 0) if m["head"] == "kmeans" else (0, int(re.sub(r"\D", "", m["head"]) or 0))),
    # eval_speed/<set>/<metric>: one panel per metric, one line per entry (in name order).
    "eval_speed": (r"^eval_speed/(?P<set>[^/]+)/(?P<var>.+)$", "{var}", "{set}", lambda m: 0),
}
_SCORE_ORDER = {"nmi": 0, "ari": 1, "purity": 2}
#: The panel of a family's ``<set>/decode_errors`` (records left out), one line per set, after the scores.
DECODE_ERRORS = "decode errors"


@dataclasses.dataclass(frozen=True)
class Figure:
    """One curve figure: ``<name>.png``, a title, and its panels in reading order (None: an empty slot, so the
    next panel starts a new row)."""

    name: str
    title: str
    panels: tuple[Panel | None, ...]
    ncols: int = 3
    from_zero: bool = False  # scores and rates: the y axis starts at 0

    @property
    def keys(self) -> list[str]:
        """The metric keys it draws, in panel order."""
        return [key for p in self.panels if p is not None for key, _ in p[1]]


def _parts(key: str) -> list[str]:
    return key.split("/")


def eval_panels(keys: Iterable[str], family: str) -> list[Panel]:
    """The panels of one evaluation family: e.g. retrieval gets one panel per set and direction with its
    R@1, R@5, R@10 as lines; cluster one per set and score with k-means and each scoring head as lines. A key
    of the family that the layout does not know gets a panel of its own; every set's ``decode_errors`` share
    the last panel."""
    pattern, title, label, order = _EVAL_PANELS[family]
    panels: dict[str, list[tuple[object, str, str]]] = {}
    for key in sorted(k for k in keys if _parts(k)[0] == family):
        m = re.match(pattern, key)
        if len(_parts(key)) == 3 and _parts(key)[2] == "decode_errors":
            panels.setdefault(DECODE_ERRORS, []).append((0, key, _parts(key)[1]))
        elif m is None:
            panels.setdefault(key[len(family) + 1:] or key, []).append((0, key, ""))
        else:
            panels.setdefault(title.format(**m.groupdict()), []).append((order(m), key, label.format(**m.groupdict())))
    titles = sorted(panels, key=lambda t: (t == DECODE_ERRORS, t.split(" ")[0],
                                           _SCORE_ORDER.get(t.split(" ")[-1], 0), t))
    return [(t, [(key, lab) for _, key, lab in sorted(panels[t], key=lambda x: x[0])]) for t in titles]


def _one_per_key(keys: Sequence[str], prefix: str) -> list[Panel]:
    return [(k[len(prefix):] or k, [(k, "")]) for k in keys]


def quantile_of(leaf: str) -> float | None:
    """The fraction a metric's last name component stands for as a quantile: 'min' 0, 'p10' 0.1, 'max' 1; else
    None."""
    m = re.fullmatch(r"p(\d{1,2})", leaf)
    return {"min": 0.0, "max": 1.0}.get(leaf, int(m[1]) / 100 if m else None)


def _quantile_lines(leaves: Sequence[str]) -> list[str] | None:
    """The leaves in line order (quantiles ascending, then the rest) when they hold a distribution logged as its
    quantiles (``min``, ``max`` and at least one ``pNN``); None otherwise."""
    q = {leaf: quantile_of(leaf) for leaf in leaves}
    if not {"min", "max"} <= set(q) or sum(v is not None for v in q.values()) < 3:
        return None
    return sorted(leaves, key=lambda leaf: (q[leaf] is None, q[leaf] or 0.0, leaf))


def _rows_by_subpath(metrics: Sequence[str], prefix: str) -> tuple[list[Panel | None], int]:
    """One panel per metric, ``loss`` first in each row; metrics sharing a sub-path (``<head>/<metric>``) fill
    rows of their own. A sub-path that holds a distribution's quantiles (``<name>/min``, ``/p10``, ...,
    ``/max``) is one panel, a line per quantile, in the row of its parent path. Returns the panels with row
    breaks and the number of columns."""
    groups: dict[str, list[str]] = {}
    for m in metrics:
        groups.setdefault(m.rpartition("/")[0], []).append(m)
    rows: dict[str, list[Panel]] = {}
    for group, members in groups.items():
        lines = _quantile_lines([m.rpartition("/")[2] for m in members])
        if lines is None:
            ordered = sorted(members, key=lambda m: (m.rpartition("/")[2] != "loss", m))
            rows.setdefault(group, []).extend(_one_per_key([prefix + m for m in ordered], prefix))
        else:
            base = prefix + (group + "/" if group else "")
            rows.setdefault(group.rpartition("/")[0], []).append((group or prefix.strip("/"),
                                                                  [(base + leaf, leaf) for leaf in lines]))
    ncols = min(3, max(len(r) for r in rows.values()))
    panels: list[Panel | None] = []
    for row in sorted(rows, key=lambda g: (g != "", [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", g)])):
        if panels and len(panels) % ncols:
            panels += [None] * (ncols - len(panels) % ncols)
        panels += sorted(rows[row], key=lambda p: (p[0].rpartition("/")[2] != "loss", p[0]))
    return panels, ncols


def histograms(keys: Iterable[str]) -> dict[str, list[Panel]]:
    """The distributions logged as quantiles (``<path>/<name>/min``, ``/pNN``, ``/max``), grouped by ``<path>``:
    one histogram figure per path, one panel per ``<name>`` with its quantile keys as lines (label: the leaf)."""
    by_prefix: dict[str, list[str]] = {}
    for k in keys:
        prefix, _, leaf = k.rpartition("/")
        if prefix and quantile_of(leaf) is not None:
            by_prefix.setdefault(prefix, []).append(leaf)
    out: dict[str, list[Panel]] = {}
    for prefix in sorted(by_prefix):
        lines = _quantile_lines(by_prefix[prefix])
        if lines is not None:
            path, _, name = prefix.rpartition("/")
            out.setdefault(path or prefix, []).append((name, [(f"{prefix}/{leaf}", leaf) for leaf in lines]))
    return out


def _family_order(family: str) -> tuple[int, str]:
    known = list(EVAL_FAMILIES)
    return (known.index(family), "") if family in known else (len(known), family)


def figures(keys: Iterable[str]) -> list[Figure]:
    """Every curve figure for these metric keys, in page order; each key is drawn in exactly one figure."""
    keys = sorted(set(keys))
    train = [k for k in keys if _parts(k)[0] == "train" and len(_parts(k)) > 1]
    step_level = [k for k in train if len(_parts(k)) == 2]
    by_objective: dict[str, list[str]] = {}
    for k in train:
        if len(_parts(k)) > 2:
            by_objective.setdefault(_parts(k)[1], []).append(k)

    out = []
    losses = [k for k in ("train/loss",) if k in step_level]
    losses += [f"train/{o}/loss" for o in sorted(by_objective) if f"train/{o}/loss" in by_objective[o]]
    if losses:
        panels = [("total (weighted sum)" if k == "train/loss" else _parts(k)[1], [(k, "")]) for k in losses]
        out.append(Figure("loss", "Training loss per objective", tuple(panels)))
    for metric, title in SINGLE_FIGURES.items():
        if f"train/{metric}" in step_level:
            out.append(Figure(metric, title, ((title, [(f"train/{metric}", "")]),), ncols=1))
    rest = [k for k in step_level if k != "train/loss" and _parts(k)[1] not in SINGLE_FIGURES]
    if rest:
        out.append(Figure("train", "Other training metrics", tuple(_one_per_key(rest, "train/"))))
    for objective in sorted(by_objective):
        prefix = f"train/{objective}/"
        metrics = [k[len(prefix):] for k in by_objective[objective] if k != prefix + "loss"]
        if metrics:
            panels, ncols = _rows_by_subpath(metrics, prefix)
            out.append(Figure(f"objective_{slug(objective)}", f"Objective {objective}",
                              tuple(panels), ncols=ncols))

    families: dict[str, list[str]] = {}
    for k in keys:
        if k not in train:
            families.setdefault(_parts(k)[0], []).append(k)
    for family in sorted(families, key=_family_order):
        if family in EVAL_FAMILIES:
            title = EVAL_FAMILIES[family]
            out.append(Figure(f"eval_{family}", f"{title} over steps", tuple(eval_panels(families[family], family)),
                              ncols=4 if family == "retrieval" else 3, from_zero=True))
        else:
            out.append(Figure(f"eval_{slug(family)}", f"{family} over steps",
                              tuple(_one_per_key(families[family], family + "/"))))
    seen: dict[str, int] = {}
    for i, f in enumerate(out):  # two names with the same slug ("a b", "a_b") still get two files
        seen[f.name] = seen.get(f.name, 0) + 1
        if seen[f.name] > 1:
            out[i] = dataclasses.replace(f, name=f"{f.name}_{seen[f.name]}")
    return out


def slug(text: str) -> str:
    """A file-name-safe form of a name (figure and image file names)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "run"
