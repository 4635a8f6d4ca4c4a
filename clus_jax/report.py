"""``python -m clus_jax.report WORKDIR [WORKDIR ...] --out DIR``: PNG plots of one or more runs and one
``report.html`` that shows them, several runs overlaid in every curve.

From each run's ``metrics.jsonl``: training loss per objective, learning rate, logit scale, every evaluation
metric over steps (one figure per family: zero-shot, retrieval, probe, cluster) and, for swap runs, cluster
usage and code entropy per prototype bank. From the newest ``<workdir>/eval/step_<N>/`` of each run
(``clus_jax.evaluate.artifacts``): the zero-shot confusion matrices, per-class accuracy and a 2-D PCA of the
held-out image embeddings coloured by class. matplotlib (the ``report`` extra) is imported here only, with
the Agg backend, so training never needs it.
"""
from __future__ import annotations

import argparse
import dataclasses
import html
import json
import math
import os
import re
from collections.abc import Sequence

import numpy as np
from etils import epath

from clus_jax.common import cli

EVAL_FAMILIES = (("zeroshot", "Zero-shot classification"), ("retrieval", "Retrieval recall"),
                 ("probe", "Frozen-feature probes"), ("cluster", "Cluster quality"))
_BANK_KEY = re.compile(r"^train/swap/(bank_\d+)/(used_clusters_image|used_clusters_text|code_entropy)$")
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


@dataclasses.dataclass
class Run:
    """One workdir as the report reads it."""

    name: str
    workdir: str
    series: dict[str, tuple[np.ndarray, np.ndarray]]  # metric -> (steps, values), one value per step
    bank_sizes: dict[str, int]  # 'bank_<i>' -> K, from config.json
    batch_size: int | None  # the global batch, from config.json
    eval_step: int | None  # the newest evaluation with saved arrays
    arrays: dict  # set name -> evaluate.runner.ClassArrays of that evaluation


def _series(records: list[dict]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per metric, its finite values by step (a step logged twice keeps its newest value)."""
    by_key: dict[str, dict[int, float]] = {}
    for r in records:
        step = r.get("step")
        for k, v in r.items():
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                by_key.setdefault(k, {})[int(step)] = float(v)
    return {k: (np.array(sorted(d)), np.array([d[s] for s in sorted(d)])) for k, d in by_key.items()}


def _bank_sizes_and_batch(workdir: str) -> tuple[dict[str, int], int | None]:
    """The swap banks' sizes and the global batch from the run's config.json (empty, None without one)."""
    from clus_jax.objectives import prototypes
    from clus_jax.config.run_config import load_run_config

    try:
        config = load_run_config(workdir)
    except (FileNotFoundError, ValueError):
        return {}, None
    batch = int(config.batch_size) if config.get("batch_size") else None
    if "swap" not in dict(config.get("objectives", {})):
        return {}, batch
    sizes = prototypes.bank_sizes(config.swap)
    return dict(zip(prototypes.bank_names(len(sizes)), sizes)), batch


def run_names(workdirs: Sequence[str]) -> list[str]:
    """Short distinct labels: the last path component, more components where two runs would share one."""
    parts = [os.path.normpath(str(w)).rstrip("/").split("/") for w in workdirs]
    depth = 1
    while depth < max(len(p) for p in parts):
        names = ["/".join(p[-depth:]) for p in parts]
        if len(set(names)) == len(names):
            return names
        depth += 1
    return ["/".join(p) for p in parts]


def load_run(workdir: str, name: str) -> Run:
    """Reads a run's metrics and its newest evaluation arrays; a workdir without ``metrics.jsonl`` fails."""
    from clus_jax.evaluate import artifacts
    from clus_jax.train.metrics_writer import read_metrics

    if not (epath.Path(workdir) / "metrics.jsonl").exists():
        raise FileNotFoundError(f"{workdir!r} holds no metrics.jsonl (is it a run's workdir?)")
    steps = artifacts.steps(workdir)
    eval_step = steps[-1] if steps else None
    arrays = artifacts.read(artifacts.step_dir(workdir, eval_step)) if eval_step is not None else {}
    bank_sizes, batch_size = _bank_sizes_and_batch(workdir)
    return Run(name=name, workdir=workdir, series=_series(read_metrics(workdir)), bank_sizes=bank_sizes,
               batch_size=batch_size, eval_step=eval_step, arrays=arrays)


# --------------------------------------------------------------------------------------------- drawing


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise cli.UsageError("the report needs matplotlib: pip install -e '.[report]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _run_colors(runs: Sequence[Run]) -> dict[str, tuple]:
    plt = _pyplot()
    cmap = plt.get_cmap("tab10")
    return {r.name: cmap(i % 10) for i, r in enumerate(runs)}


def _grid(plt, n: int, ncols: int, panel=(4.6, 3.2)):
    ncols = max(1, min(ncols, n))
    nrows = -(-n // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(panel[0] * ncols, panel[1] * nrows + 0.8), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat[:n])


#: A panel: its title and its lines, (metric key, label of the line within the panel).
Panel = tuple[str, list[tuple[str, str]]]

_VARIANT_STYLES = ("-", "--", ":", "-.")
_VARIANT_MARKERS = ("o", "s", "^", "D", "v", "P")
_EVAL_PANELS = {
    # family: (regex, panel title, line label, sort key of the lines)
    "zeroshot": (r"^zeroshot/(?P<set>[^/]+)/(?P<var>.+)$", "{set}", "{var}",
                 lambda m: (["top1", "top5", "mean_per_class_top1"] + [m["var"]]).index(m["var"])),
    "retrieval": (r"^retrieval/(?P<set>[^/]+)/(?P<dir>i2t|t2i)_r(?P<k>\d+)$", "{set} {dir}", "R@{k}",
                  lambda m: int(m["k"])),
    "probe": (r"^probe/(?P<set>[^/]+)/(?P<var>.+)$", "{set}", "{var}",
              lambda m: (["linear_top1", "knn_top1"] + [m["var"]]).index(m["var"])),
    "cluster": (r"^cluster/(?P<set>[^/]+)/(?P<source>.+)_(?P<score>nmi|ari|purity)$", "{set} {score}", "{source}",
                lambda m: (-1, 0) if m["source"] == "kmeans" else (0, int(re.sub(r"\D", "", m["source"]) or 0))),
}
_SCORE_ORDER = {"nmi": 0, "ari": 1, "purity": 2}


def eval_panels(runs: Sequence[Run], family: str) -> list[Panel]:
    """The panels of one evaluation family: e.g. retrieval gets one panel per set and direction with its
    R@1, R@5, R@10 as lines; cluster one per set and score with k-means and each bank as lines."""
    pattern, title, label, order = _EVAL_PANELS[family]
    panels: dict[str, list[tuple[object, str, str]]] = {}
    keys = sorted({k for r in runs for k in r.series if k.startswith(family + "/")})
    for key in keys:
        m = re.match(pattern, key)
        if m is None:
            panels.setdefault(key[len(family) + 1:], []).append((0, key, ""))
            continue
        line = label.format(**m.groupdict())
        sizes = {r.bank_sizes.get(line) for r in runs if key in r.series}
        if family == "cluster" and len(sizes) == 1 and None not in sizes:
            line += f" (K={sizes.pop()})"
        panels.setdefault(title.format(**m.groupdict()), []).append((order(m), key, line))
    titles = sorted(panels, key=lambda t: (t.split(" ")[0], _SCORE_ORDER.get(t.split(" ")[-1], 0), t))
    return [(t, [(key, lab) for _, key, lab in sorted(panels[t], key=lambda x: x[0])]) for t in titles]


def _curves(runs: Sequence[Run], panels: Sequence[Panel], title: str, path: str, *, ncols: int = 3,
            from_zero: bool = False) -> str:
    """One panel per entry, each run one colour; lines within a panel differ by line style and marker
    (by colour too when there is one run). A single evaluation shows as a dot."""
    plt = _pyplot()
    colors = _run_colors(runs)
    cmap = plt.get_cmap("tab10")
    single = len(panels) == 1
    fig, axes = _grid(plt, len(panels), ncols, panel=(6.5, 3.6) if single else (4.6, 3.2))
    for ax, (panel_title, lines) in zip(axes, panels):
        panel_title = title if single else panel_title
        for r in runs:
            for v, (key, label) in enumerate(lines):
                if key not in r.series:
                    continue
                steps, values = r.series[key]
                color = cmap(v % 10) if len(runs) == 1 and len(lines) > 1 else colors[r.name]
                name = " ".join(x for x in (r.name if len(runs) > 1 else "", label) if x)
                ax.plot(steps, values, _VARIANT_STYLES[v % len(_VARIANT_STYLES)], color=color, label=name or None,
                        marker=_VARIANT_MARKERS[v % len(_VARIANT_MARKERS)] if len(steps) < 12 else None,
                        markersize=4, linewidth=1.6)
        ax.set_title(panel_title, fontsize=12 if single else 10)
        ax.set_xlabel("step", fontsize=9)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
        if from_zero:
            ax.set_ylim(bottom=0)
        if ax.get_legend_handles_labels()[0] and (len(lines) > 1 or len(runs) > 1):
            ax.legend(fontsize=7, frameon=False)
    if not single:
        fig.suptitle(title, fontsize=13)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _loss_panels(runs: Sequence[Run]) -> list[Panel]:
    """``train/loss`` first, then each objective's ``train/<objective>/loss`` (no per-bank entries)."""
    keys = sorted({k for r in runs for k in r.series if re.fullmatch(r"train/[^/]+/loss", k)})
    return [("total (weighted sum)", [("train/loss", "")])] + [(k.split("/")[1], [(k, "")]) for k in keys]


def _eval_keys(runs: Sequence[Run], family: str) -> list[str]:
    return sorted({k for r in runs for k in r.series if k.startswith(family + "/")})


def _bank_figure(runs: Sequence[Run], path: str) -> str | None:
    """Rows: banks; columns: clusters used by image and by text codes (of K), code entropy (of log K)."""
    banks = sorted({m.group(1) for r in runs for k in r.series if (m := _BANK_KEY.match(k))},
                   key=lambda b: int(b.split("_")[1]))
    if not banks:
        return None
    plt = _pyplot()
    colors = _run_colors(runs)
    fig, axes = plt.subplots(len(banks), 2, figsize=(10, 3.0 * len(banks)), squeeze=False)
    for row, bank in zip(axes, banks):
        for r in runs:
            for modality, style in (("image", "-"), ("text", "--")):
                key = f"train/swap/{bank}/used_clusters_{modality}"
                if key in r.series:
                    row[0].plot(*r.series[key], style, color=colors[r.name], label=f"{r.name} ({modality})")
            key = f"train/swap/{bank}/code_entropy"
            if key in r.series:
                row[1].plot(*r.series[key], color=colors[r.name], label=r.name)
        sizes = sorted({r.bank_sizes[bank] for r in runs if bank in r.bank_sizes})
        attainable = sorted({min(r.bank_sizes[bank], r.batch_size or r.bank_sizes[bank])
                             for r in runs if bank in r.bank_sizes})
        for k in attainable:
            row[0].axhline(k, color="gray", linestyle=":", linewidth=1)
        for k in sizes:
            row[1].axhline(math.log(k), color="gray", linestyle=":", linewidth=1)
        k_text = "/".join(str(k) for k in sizes) or "?"
        row[0].set_title(f"{bank} (K={k_text}): clusters used per batch (dotted = min(K, batch))", fontsize=10)
        row[1].set_title(f"{bank}: code entropy (nats; dotted = log K, uniform codes)", fontsize=10)
        for ax in row:
            ax.set_xlabel("step", fontsize=9)
            ax.grid(alpha=0.3)
            ax.tick_params(labelsize=8)
        row[0].set_ylim(bottom=0)
        row[1].set_ylim(bottom=0)
        row[0].legend(fontsize=8, frameon=False)
    fig.suptitle("Swap prototype banks: usage (solid = image codes, dashed = text codes) and code entropy",
                 fontsize=12)
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _confusion_figure(run: Run, set_name: str, path: str) -> str:
    """Rows = true class, columns = zero-shot prediction; colour = fraction of the row, numbers = counts."""
    plt = _pyplot()
    a = run.arrays[set_name]
    conf = np.asarray(a.confusion)
    c = len(a.classnames)
    rows = conf.sum(axis=1, keepdims=True)
    frac = np.divide(conf, np.maximum(rows, 1))
    side = max(5.0, 0.42 * c + 2.5)
    fig, ax = plt.subplots(figsize=(side + 1.2, side))
    im = ax.imshow(frac, cmap="Blues", vmin=0.0, vmax=1.0)
    fontsize = 8 if c <= 12 else 7
    for i in range(c):
        for j in range(c):
            if conf[i, j]:
                ax.text(j, i, str(conf[i, j]), ha="center", va="center", fontsize=fontsize,
                        color="white" if frac[i, j] > 0.5 else "black")
    for i in range(c):  # outline the diagonal (correct predictions)
        ax.add_patch(plt.Rectangle((i - 0.42, i - 0.42), 0.84, 0.84, fill=False, edgecolor="darkorange", linewidth=1.0))
    acc = a.per_class_accuracy
    ylabels = [f"{name}  ({'-' if np.isnan(v) else f'{v:.2f}'})" for name, v in zip(a.classnames, acc)]
    ax.set_xticks(range(c), a.classnames, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(c), ylabels, fontsize=8)
    ax.set_xlabel("zero-shot prediction")
    ax.set_ylabel("true class  (per-class accuracy)")
    total = conf.sum()
    top1 = np.trace(conf) / total if total else float("nan")
    ax.set_title(f"{run.name}: {set_name} zero-shot confusion at step {run.eval_step}\n"
                 f"top-1 {top1:.3f}, {total} images (colour = fraction of the true class; orange = correct)", fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _class_styles(plt, classnames: Sequence[str]) -> list[tuple[object, str]]:
    """(colour, marker) per class. Names that form a grid of two words ("red circle", "red triangle", ...,
    as easy-VQA's colour x shape) get one colour per first word (the word itself when matplotlib knows it
    as a colour) and one marker per second word; other names cycle through tab10 colours, then markers."""
    from matplotlib import colors as mcolors

    words = [str(c).split(" ", 1) for c in classnames]
    firsts = list(dict.fromkeys(w[0] for w in words))
    seconds = list(dict.fromkeys(w[1] for w in words if len(w) == 2))
    grid = (all(len(w) == 2 for w in words) and len(firsts) <= 10 and 1 < len(seconds) <= len(_MARKERS)
            and len(set(map(tuple, words))) == len(words) == len(firsts) * len(seconds))
    cmap = plt.get_cmap("tab10")
    if grid:
        named = all(mcolors.is_color_like(f) for f in firsts)
        palette = {f: (f if named else cmap(i)) for i, f in enumerate(firsts)}
        return [(palette[w[0]], _MARKERS[seconds.index(w[1])]) for w in words]
    return [(cmap(k % 10), _MARKERS[(k // 10) % len(_MARKERS)]) for k in range(len(classnames))]


def _pca_figure(run: Run, set_name: str, path: str) -> str:
    """Image embeddings on their first two principal axes, one colour and marker per class."""
    plt = _pyplot()
    a = run.arrays[set_name]
    c = len(a.classnames)
    styles = _class_styles(plt, a.classnames)
    fig, ax = plt.subplots(figsize=(10 if c > 12 else 8.5, 6.5))
    # Drawn in interleaved layers (a slice of every class per layer, points in a fixed random order), so the
    # class drawn last does not hide the others where they overlap.
    order = np.random.default_rng(0).permutation(len(a.labels))
    layers = 8
    size = 16 if len(a.labels) <= 1000 else 10
    for layer in range(layers):
        for k in range(c):
            idx = order[a.labels[order] == k]
            idx = idx[layer * len(idx) // layers:(layer + 1) * len(idx) // layers]
            if len(idx) == 0 and layer:
                continue
            color, marker = styles[k]
            ax.scatter(a.projection[idx, 0], a.projection[idx, 1], s=size, alpha=0.75, color=color, marker=marker,
                       label=a.classnames[k] if layer == 0 else None, edgecolors="black", linewidths=0.25)
    ev = a.explained_variance
    ax.set_xlabel(f"PC 1 ({100 * ev[0]:.1f}% of variance)")
    ax.set_ylabel(f"PC 2 ({100 * ev[1]:.1f}% of variance)")
    ax.set_title(f"{run.name}: {set_name} image embeddings, PCA at step {run.eval_step} ({len(a.labels)} images)",
                 fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, markerscale=1.5, frameon=False, loc="center left", bbox_to_anchor=(1.0, 0.5),
              ncol=2 if c > 16 else 1)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------------- the page


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "run"


def _final_table(runs: Sequence[Run]) -> str:
    """Each run's newest value of every evaluation metric (rows) by run (columns)."""
    keys = [k for family, _ in EVAL_FAMILIES for k in _eval_keys(runs, family)]
    if not keys:
        return "<p>No evaluation metrics.</p>"
    head = "".join(f"<th>{html.escape(r.name)}</th>" for r in runs)
    rows = []
    for k in keys:
        cells = []
        for r in runs:
            if k in r.series:
                steps, values = r.series[k]
                cells.append(f"<td>{values[-1]:.4f}</td>")
            else:
                cells.append("<td></td>")
        rows.append(f"<tr><td><code>{html.escape(k)}</code></td>{''.join(cells)}</tr>")
    last = "".join(f"<td>{int(r.series[keys[0]][0][-1]) if keys[0] in r.series else ''}</td>" for r in runs)
    return (f"<table><tr><th>metric (newest evaluation)</th>{head}</tr>"
            f"<tr><td>step</td>{last}</tr>{''.join(rows)}</table>")


def _per_class_table(run: Run, set_name: str) -> str:
    a = run.arrays[set_name]
    rows = "".join(f"<tr><td>{html.escape(n)}</td><td>{'' if np.isnan(v) else f'{v:.3f}'}</td>"
                   f"<td>{int(a.confusion[i].sum())}</td></tr>"
                   for i, (n, v) in enumerate(zip(a.classnames, a.per_class_accuracy)))
    return f"<table class='small'><tr><th>class</th><th>accuracy</th><th>images</th></tr>{rows}</table>"


def write_report(workdirs: Sequence[str], out: str) -> dict[str, list[str]]:
    """Draws every plot for ``workdirs`` into ``out`` and writes ``out/report.html``; returns the files."""
    runs = [load_run(w, n) for w, n in zip(workdirs, run_names(workdirs))]
    out_dir = epath.Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    sections: list[tuple[str, list[str], str]] = []  # (title, png names, extra html)

    def png(name: str) -> str:
        return os.fspath(out_dir / name)

    sections.append(("Training loss", [os.path.basename(_curves(
        runs, _loss_panels(runs), "Training loss per objective", png("loss.png")))], ""))
    optim_pngs = []
    for key, name, title in (("train/learning_rate", "learning_rate.png", "Learning rate"),
                             ("train/logit_scale", "logit_scale.png", "Logit scale (1 / temperature)")):
        if any(key in r.series for r in runs):
            optim_pngs.append(os.path.basename(_curves(runs, [(key, [(key, "")])], title, png(name), ncols=1)))
    sections.append(("Learning rate and logit scale", optim_pngs, ""))
    for family, title in EVAL_FAMILIES:
        panels = eval_panels(runs, family)
        if panels:
            ncols = 4 if family == "retrieval" else 3
            sections.append((title, [os.path.basename(_curves(
                runs, panels, f"{title} over steps", png(f"eval_{family}.png"), ncols=ncols, from_zero=True))], ""))
    bank_png = _bank_figure(runs, png("swap_banks.png"))
    sections.append(("Swap prototype banks", [os.path.basename(bank_png)] if bank_png else [],
                     "" if bank_png else "<p>No run trained the swap objective.</p>"))
    for r in runs:
        pngs, extra = [], []
        for set_name in r.arrays:
            slug = _slug(f"{r.name}_{set_name}")
            pngs.append(os.path.basename(_confusion_figure(r, set_name, png(f"confusion_{slug}.png"))))
            pngs.append(os.path.basename(_pca_figure(r, set_name, png(f"pca_{slug}.png"))))
            extra.append(f"<details><summary>{html.escape(set_name)}: per-class zero-shot accuracy</summary>"
                         f"{_per_class_table(r, set_name)}</details>")
        note = "" if r.arrays else "<p>No saved evaluation arrays (re-evaluate with python -m clus_jax.evaluate).</p>"
        sections.append((f"{r.name}: confusion matrices and PCA at step {r.eval_step}", pngs, note + "".join(extra)))

    body = [f"<h1>clus_jax report</h1><p>Runs: {', '.join(f'<code>{html.escape(r.workdir)}</code>' for r in runs)}</p>",
            "<h2>Final evaluation</h2>", _final_table(runs)]
    for title, pngs, extra in sections:
        body.append(f"<h2>{html.escape(title)}</h2>")
        body += [f"<img src='{html.escape(p)}' alt='{html.escape(p)}'>" for p in pngs]
        body.append(extra)
    style = ("body{font-family:sans-serif;max-width:1600px;margin:auto;padding:1em}img{max-width:100%;"
             "display:block;margin:0.5em 0}table{border-collapse:collapse;font-size:13px}td,th{border:1px solid "
             "#ccc;padding:2px 8px;text-align:right}td:first-child{text-align:left}")
    (out_dir / "report.html").write_text(
        f"<!doctype html><html><head><meta charset='utf-8'><title>clus_jax report</title><style>{style}</style>"
        f"</head><body>{''.join(body)}</body></html>\n")
    return {"report": [os.fspath(out_dir / "report.html")],
            "png": sorted(os.fspath(out_dir / p) for _, pngs, _ in sections for p in pngs)}


class _ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not argparse's usage block
        cli.fail(message)


def main(argv: Sequence[str] | None = None) -> None:
    p = _ArgumentParser(prog="python -m clus_jax.report", description=__doc__.split("\n\n")[0])
    p.add_argument("workdirs", nargs="+", metavar="WORKDIR", help="run workdirs (holding metrics.jsonl)")
    p.add_argument("--out", required=True, help="directory for the PNGs and report.html")
    args = p.parse_args(argv)
    try:
        files = write_report(args.workdirs, args.out)
    except cli.UsageError as e:
        cli.fail(str(e))
    except (FileNotFoundError, ValueError) as e:
        cli.fail(cli.exception_text(e), code=1)
    print(json.dumps({"report": files["report"][0], "png": len(files["png"])}), flush=True)


if __name__ == "__main__":
    main()
