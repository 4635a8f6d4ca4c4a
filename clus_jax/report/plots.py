"""The report's figures as PNG files: curves of metrics over steps (a ``figures.Figure``, several runs
overlaid), a histogram of a run's distributions logged as quantiles, and from a run's newest evaluation arrays
the zero-shot confusion matrix and a 2-D PCA of the held-out image embeddings. matplotlib (the ``report``
extra) is imported here only, lazily and with the Agg backend, so training never needs it."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from clus_jax.common import cli, files
from clus_jax.report.figures import Figure
from clus_jax.report.runs import Run

_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")  # per class in a PCA
_VARIANT_STYLES = ("-", "--", ":", "-.")  # per line within a curve panel
_VARIANT_MARKERS = ("o", "s", "^", "D", "v", "P")


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


def _grid(plt, slots: Sequence[object], ncols: int, panel=(4.6, 3.2)):
    """A grid of ``ncols`` columns with one axes per slot; the axes of a None slot and those past the last
    slot are hidden. Returns the figure and the visible axes, in slot order."""
    n = len(slots)
    ncols = max(1, min(ncols, n))
    nrows = -(-n // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(panel[0] * ncols, panel[1] * nrows + 0.8), squeeze=False)
    for ax, slot in zip(axes.flat, [*slots, *[None] * (nrows * ncols - n)]):
        ax.set_visible(slot is not None)
    return fig, [ax for ax, slot in zip(axes.flat, slots) if slot is not None]


def _save(plt, fig, path: str) -> str:
    """Writes ``fig`` as a PNG at ``path`` (atomically) and frees it."""
    files.atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)
    return path


def curves(runs: Sequence[Run], figure: Figure, path: str) -> str:
    """Draws ``figure`` at ``path``: one panel per entry, each run one colour; lines within a panel differ by
    line style and marker (by colour too when there is one run). A single evaluation shows as a dot."""
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    colors = _run_colors(runs)
    cmap = plt.get_cmap("tab10")
    panels = [p for p in figure.panels if p is not None]
    title = figure.title
    single = len(panels) == 1
    fig, axes = _grid(plt, figure.panels, figure.ncols, panel=(6.5, 3.6) if single else (4.6, 3.2))
    for ax, (panel_title, lines) in zip(axes, panels):
        if single:  # the figure's title names it, with the panel's where that says more
            panel_title = title if panel_title == title else f"{title}: {panel_title}"
        if len(lines) == 1 and lines[0][1]:  # a lone line has no legend: the title names it
            panel_title = f"{panel_title}: {lines[0][1]}"
        counts = True  # every value a whole number (errors, skipped records): whole-number ticks from 0 to >= 1
        for r in runs:
            for v, (key, label) in enumerate(lines):
                if key not in r.series:
                    continue
                steps, values = r.series[key]
                counts = counts and bool(np.all(values == np.round(values)))
                color = cmap(v % 10) if len(runs) == 1 and len(lines) > 1 else colors[r.name]
                name = " ".join(x for x in (r.name if len(runs) > 1 else "", label) if x)
                ax.plot(steps, values, _VARIANT_STYLES[v % len(_VARIANT_STYLES)], color=color, label=name or None,
                        marker=_VARIANT_MARKERS[v % len(_VARIANT_MARKERS)] if len(steps) < 12 else None,
                        markersize=4, linewidth=1.6)
        ax.set_title(panel_title, fontsize=12 if single else 10)
        ax.set_xlabel("step", fontsize=9)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
        if counts:
            ax.yaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_ylim(bottom=min(0.0, ax.get_ylim()[0]), top=max(1.0, ax.get_ylim()[1]))
        if figure.from_zero:
            ax.set_ylim(bottom=0)
        if ax.get_legend_handles_labels()[0] and (len(lines) > 1 or len(runs) > 1):
            ax.legend(fontsize=7, frameon=False)
    if not single:
        fig.suptitle(title, fontsize=13)
    fig.tight_layout()
    return _save(plt, fig, path)


def confusion_figure(run: Run, set_name: str, path: str) -> str:
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
                 f"top-1 {top1:.3f}, {total} images\n(colour = fraction of the true class; orange = correct)", fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    return _save(plt, fig, path)


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


def pca_figure(run: Run, set_name: str, path: str) -> str:
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
    return _save(plt, fig, path)


def _quantiles_at(run: Run, lines: Sequence[tuple[str, str]]) -> dict[int, np.ndarray]:
    """Step -> the values of a panel's quantile keys, at every step where all of them were logged."""
    by_step = [dict(zip(*run.series[key])) if key in run.series else {} for key, _ in lines]
    steps = sorted(set.intersection(*(set(d) for d in by_step)))
    return {int(s): np.array([d[s] for d in by_step]) for s in steps}


def histogram(run: Run, title: str, panels: Sequence[tuple[str, list[tuple[str, str]]]], path: str) -> str:
    """Each panel's distribution, logged as quantiles (``figures.histograms``), as an equal-mass histogram at the
    last step with all of them: the bar between two quantiles holds their share of the samples, so its height
    is that share over its width (a tie is a spike). The panel's ``<name>/mean`` (when logged) is dashed, 0
    dotted."""
    plt = _pyplot()
    from clus_jax.report.figures import quantile_of

    fig, axes = _grid(plt, panels, len(panels), panel=(5.6, 3.8))
    for ax, (name, lines) in zip(axes, panels):
        at = _quantiles_at(run, lines)
        if at:
            step = max(at)
            edges = np.maximum.accumulate(at[step])  # quantiles never decrease; guards a rounding inversion
            floor = 2e-3 * max(float(edges[-1] - edges[0]), 1e-12)
            shares = np.diff([quantile_of(label) for _, label in lines])
            ax.stairs(shares / np.maximum(np.diff(edges), floor), edges, fill=True, alpha=0.6, color="tab:blue")
            mean = dict(zip(*run.series.get(lines[0][0].rpartition("/")[0] + "/mean", ([], []))))
            if step in mean:
                ax.axvline(mean[step], color="tab:red", linestyle="--", linewidth=1.2, label=f"mean {mean[step]:.3g}")
                ax.legend(fontsize=8, frameon=False)
            name = f"{name} at step {step}"
        ax.axvline(0.0, color="black", linewidth=0.8, linestyle=":")
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("value", fontsize=9)
        ax.set_ylabel("share of samples per unit", fontsize=9)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{run.name}: {title}, histogram of the last logged quantiles", fontsize=12)
    fig.tight_layout()
    return _save(plt, fig, path)
