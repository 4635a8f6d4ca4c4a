"""``report.html``: every figure under its title with the metric keys it draws, each run's newest value of every
metric outside training, per-class accuracy tables, and the keys that are not drawn (bookkeeping, or no
finite value) so that nothing a run logged goes unmentioned."""
from __future__ import annotations

import dataclasses
import html
from collections.abc import Sequence

import numpy as np

from clus_jax.report.runs import Run

_STYLE = ("body{font-family:sans-serif;max-width:1600px;margin:auto;padding:1em}img{max-width:100%;"
          "display:block;margin:0.5em 0}table{border-collapse:collapse;font-size:13px}td,th{border:1px solid "
          "#ccc;padding:2px 8px;text-align:right}td:first-child{text-align:left}p.keys{font-size:12px;color:#444}")


@dataclasses.dataclass
class Section:
    """A titled part of the page: its images, each with the metric keys it draws, then any extra HTML."""

    title: str
    images: list[tuple[str, list[str]]]  # (PNG file name, metric keys drawn in it)
    extra: str = ""


def _codes(keys: Sequence[str]) -> str:
    return ", ".join(f"<code>{html.escape(k)}</code>" for k in keys)


def _section(s: Section) -> str:
    parts = [f"<h2>{html.escape(s.title)}</h2>"]
    for png, keys in s.images:
        parts.append(f"<img src='{html.escape(png)}' alt='{html.escape(png)}'>")
        if keys:
            parts.append(f"<p class='keys'><b>{html.escape(png)}</b> draws {_codes(keys)}</p>")
    return "".join(parts) + s.extra


def final_table(runs: Sequence[Run], keys: Sequence[str]) -> str:
    """Each run's newest value of each of ``keys`` (rows) by run (columns), under the newest step of any."""
    keys = [k for k in keys if any(k in r.series for r in runs)]
    if not keys:
        return "<p>No evaluation metrics.</p>"
    head = "".join(f"<th>{html.escape(r.name)}</th>" for r in runs)
    rows = []
    for k in keys:
        cells = "".join(f"<td>{r.series[k][1][-1]:.4f}</td>" if k in r.series else "<td></td>" for r in runs)
        rows.append(f"<tr><td><code>{html.escape(k)}</code></td>{cells}</tr>")
    newest = [max((int(r.series[k][0][-1]) for k in keys if k in r.series), default=None) for r in runs]
    last = "".join(f"<td>{'' if s is None else s}</td>" for s in newest)
    return (f"<table><tr><th>metric (newest value)</th>{head}</tr>"
            f"<tr><td>step</td>{last}</tr>{''.join(rows)}</table>")


def per_class_table(run: Run, set_name: str) -> str:
    """One zero-shot set's accuracy and image count per class, folded under its name."""
    a = run.arrays[set_name]
    rows = "".join(f"<tr><td>{html.escape(n)}</td><td>{'' if np.isnan(v) else f'{v:.3f}'}</td>"
                   f"<td>{int(a.confusion[i].sum())}</td></tr>"
                   for i, (n, v) in enumerate(zip(a.classnames, a.per_class_accuracy)))
    return (f"<details><summary>{html.escape(set_name)}: per-class zero-shot accuracy</summary>"
            f"<table class='small'><tr><th>class</th><th>accuracy</th><th>images</th></tr>{rows}</table></details>")


def page(runs: Sequence[Run], sections: Sequence[Section], final_keys: Sequence[str],
         not_drawn: dict[str, str]) -> str:
    """The whole page; ``not_drawn`` maps each logged key that no figure draws to why."""
    body = [f"<h1>clus_jax report</h1><p>Runs: {', '.join(f'<code>{html.escape(r.workdir)}</code>' for r in runs)}</p>",
            "<h2>Final values</h2>", final_table(runs, final_keys)]
    body += [_section(s) for s in sections]
    if not_drawn:
        items = "".join(f"<li><code>{html.escape(k)}</code>: {html.escape(why)}</li>" for k, why in sorted(not_drawn.items()))
        body.append(f"<h2>Logged, not drawn</h2><ul>{items}</ul>")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>clus_jax report</title><style>{_STYLE}</style>"
            f"</head><body>{''.join(body)}</body></html>\n")
