"""The whole report of some runs into one directory: every curve figure (``figures``), each run's histograms of
the distributions it logged as quantiles, its confusion matrices and PCA from its newest evaluation arrays, and
``report.html`` showing them."""
from __future__ import annotations

import os
from collections.abc import Sequence

from etils import epath

from clus_jax.common import files
from clus_jax.report import html, plots
from clus_jax.report.figures import figures, histograms, slug
from clus_jax.report.runs import BOOKKEEPING, Run, load_runs


def _arrays_section(run: Run, out_dir: epath.Path) -> html.Section:
    """One run's confusion matrix and PCA per zero-shot set of its newest evaluation, with per-class tables."""
    images, extra = [], []
    for set_name in run.arrays:
        name = slug(f"{run.name}_{set_name}")
        for kind, draw in (("confusion", plots.confusion_figure), ("pca", plots.pca_figure)):
            images.append((os.path.basename(draw(run, set_name, os.fspath(out_dir / f"{kind}_{name}.png"))), []))
        extra.append(html.per_class_table(run, set_name))
    note = "" if run.arrays else "<p>No saved evaluation arrays (re-evaluate with python -m clus_jax.evaluate).</p>"
    at = f" at step {run.eval_step}" if run.arrays else ""
    return html.Section(f"{run.name}: confusion matrices and PCA{at}", images, note + "".join(extra))


def _histograms_section(run: Run, out_dir: epath.Path) -> list[html.Section]:
    """One run's distributions logged as quantiles, a histogram figure per path (``figures.histograms``)."""
    images = []
    for path, panels in histograms(run.series).items():
        png = plots.histogram(run, path, panels, os.fspath(out_dir / f"hist_{slug(path)}_{slug(run.name)}.png"))
        images.append((os.path.basename(png), [key for _, lines in panels for key, _ in lines]))
    return [html.Section(f"{run.name}: distributions logged as quantiles", images)] if images else []


def write_report(workdirs: Sequence[str], out: str) -> dict[str, list[str]]:
    """Draws every plot for ``workdirs`` into ``out`` and writes ``out/report.html``; returns the files."""
    runs = load_runs(workdirs)
    out_dir = epath.Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    curve_figures = figures({k for r in runs for k in r.series})
    sections = [html.Section(f.title, [(os.path.basename(plots.curves(runs, f, os.fspath(out_dir / f"{f.name}.png"))),
                                        f.keys)]) for f in curve_figures]
    sections += [section for r in runs for section in _histograms_section(r, out_dir)]
    sections += [_arrays_section(r, out_dir) for r in runs]
    drawn = {k for f in curve_figures for k in f.keys}
    logged = {k for r in runs for k in r.logged}
    not_drawn = {k: "bookkeeping" if k in BOOKKEEPING else "no finite number logged" for k in logged - drawn}
    final_keys = [k for f in curve_figures for k in f.keys if not k.startswith("train/")]
    files.atomic_write_bytes(out_dir / "report.html", html.page(runs, sections, final_keys, not_drawn).encode())
    return {"report": [os.fspath(out_dir / "report.html")],
            "png": sorted(os.fspath(out_dir / png) for s in sections for png, _ in s.images)}
