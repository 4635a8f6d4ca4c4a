"""The PNGs: a curve figure's grid (empty slots start a new row) and the confusion and PCA figures of a run's
evaluation arrays, each a readable image."""
import numpy as np
import pytest
from PIL import Image

from clus_jax.evaluate.runner import ClassArrays
from clus_jax.report import plots
from clus_jax.report.figures import Figure
from clus_jax.report.runs import Run

pytest.importorskip("matplotlib")


def size(path) -> tuple[int, int]:
    with Image.open(path) as im:
        im.verify()
        return im.size


def a_run(**arrays) -> Run:
    steps = np.arange(1, 6)
    return Run(name="r", workdir="runs/r", logged={"a", "b"}, eval_step=5, arrays=arrays,
               series={"a": (steps, 1.0 / steps), "b": (steps, steps * 2.0)})


def test_an_empty_slot_starts_a_new_row(tmp_path):
    run = a_run()
    one_row = Figure("f", "t", (("a", [("a", "")]), ("b", [("b", "")])), ncols=2)
    two_rows = Figure("f", "t", (("a", [("a", "")]), None, ("b", [("b", "")])), ncols=2)
    w1, h1 = size(plots.curves([run], one_row, str(tmp_path / "one.png")))
    w2, h2 = size(plots.curves([run], two_rows, str(tmp_path / "two.png")))
    assert w1 == w2 >= 800 and h2 > 1.7 * h1 > 500
    with Image.open(tmp_path / "two.png") as im:  # the empty slot, right of "a", is blank
        pixels = np.asarray(im.convert("L"))
    top_right, top_left = pixels[h2 // 10:h2 // 2, w2 // 2 + 10:], pixels[h2 // 10:h2 // 2, :w2 // 2 - 10]
    assert (top_right < 250).mean() < 0.01 < (top_left < 250).mean()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.png", "two.png"]  # no temporary file left


def test_confusion_and_pca_figures_of_the_arrays(tmp_path):
    names = [f"{c} {s}" for c in ("red", "blue", "green") for s in ("circle", "square")]
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(6), 20)
    conf = np.zeros((6, 6), np.int64)
    np.add.at(conf, (labels, (labels + (rng.random(120) < 0.3)) % 6), 1)
    a = ClassArrays(classnames=names, confusion=conf, per_class_accuracy=np.diag(conf) / 20.0,
                    projection=rng.normal(size=(120, 2)).astype(np.float32) + labels[:, None],
                    explained_variance=np.array([0.4, 0.2]), labels=labels)
    run = a_run(s=a)
    w, h = size(plots.confusion_figure(run, "s", str(tmp_path / "confusion.png")))
    assert w >= 500 and h >= 500
    w, h = size(plots.pca_figure(run, "s", str(tmp_path / "pca.png")))
    assert w >= 800 and h >= 600


def test_a_histogram_from_logged_quantiles_gives_each_bar_its_share(tmp_path, monkeypatch):
    """Quantiles min, p10, p50, p90, max at the last step: four bars holding 10%, 40%, 40% and 10% of the samples,
    each as tall as its share over its width; the earlier step is not drawn."""
    steps = np.array([1, 2])
    edges = np.array([-1.0, -0.5, 0.0, 0.5, 3.0])
    series = {f"m/d/{q}": (steps, np.array([9.0, e])) for q, e in zip(("min", "p10", "p50", "p90", "max"), edges)}
    series["m/d/mean"] = (steps, np.array([9.0, 0.1]))
    run = Run(name="r", workdir="runs/r", logged=set(series), eval_step=None, arrays={}, series=series)
    drawn, save = [], plots._save
    monkeypatch.setattr(plots, "_save", lambda plt, fig, path: (drawn.append(fig), save(plt, fig, path))[1])
    panel = ("d", [(f"m/d/{q}", q) for q in ("min", "p10", "p50", "p90", "max")])
    w, h = size(plots.histogram(run, "m", [panel], str(tmp_path / "hist.png")))
    assert w >= 500 and h >= 350
    (ax,) = [a for a in drawn[0].axes if a.get_visible()]
    (bars,) = ax.patches
    values, got_edges, _ = bars.get_data()
    np.testing.assert_array_equal(got_edges, edges)
    np.testing.assert_allclose(values, np.array([0.1, 0.4, 0.4, 0.1]) / np.diff(edges), rtol=1e-12)
    assert sorted(line.get_xdata()[0] for line in ax.lines) == [0.0, 0.1]  # zero and the mean
    assert ax.get_title() == "d at step 2"
