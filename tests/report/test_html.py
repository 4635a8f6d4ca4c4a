"""report.html: each figure named with the keys it draws, the newest values, and every key it does not draw."""
import numpy as np

from clus_jax.report import html
from clus_jax.report.runs import Run


def run(name, series) -> Run:
    return Run(name=name, workdir=f"runs/{name}", arrays={}, eval_step=None, logged=set(series),
               series={k: (np.array(s, dtype=int), np.array(v, dtype=float)) for k, (s, v) in series.items()})


def test_the_page_names_each_figure_with_its_keys_and_what_it_does_not_draw():
    runs = [run("a", {"toyeval/set/score": ([2, 4], [0.25, 0.5])}), run("b", {"train/loss": ([1], [3.0])})]
    sections = [html.Section("toyeval over steps", [("eval_toyeval.png", ["toyeval/set/score"])]),
                html.Section("a: confusion", [("confusion_a_s.png", [])], "<p>extra</p>")]
    page = html.page(runs, sections, ["toyeval/set/score"], {"eval/seconds": "bookkeeping"})
    assert "<h2>toyeval over steps</h2><img src='eval_toyeval.png'" in page
    assert "<b>eval_toyeval.png</b> draws <code>toyeval/set/score</code>" in page
    assert "<img src='confusion_a_s.png' alt='confusion_a_s.png'><p>extra</p>" in page
    assert "<li><code>eval/seconds</code>: bookkeeping</li>" in page
    # the newest value of a run that logged the key, an empty cell for one that did not, under the newest step
    assert "<tr><td>step</td><td>4</td><td></td></tr>" in page
    assert "<tr><td><code>toyeval/set/score</code></td><td>0.5000</td><td></td></tr>" in page


def test_a_page_without_evaluation_metrics_says_so():
    page = html.page([run("a", {"train/loss": ([1], [3.0])})], [], [], {})
    assert "No evaluation metrics." in page and "not drawn" not in page
