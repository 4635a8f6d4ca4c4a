"""Reading a run for the report: metric series, distinct run labels, the newest evaluation's arrays."""
import json

import numpy as np
import pytest

from clus_jax.evaluate import artifacts
from clus_jax.evaluate.runner import ClassArrays, Evaluation
from clus_jax.report import runs


def test_series_keeps_finite_numbers_by_step_newest_last():
    records = [{"step": 2, "a": 1.0, "b": None, "flag": True, "name": "x"},
               {"step": 1, "a": 0.5, "eval/seconds": 3.0},
               {"step": 2, "a": 2.0, "b": float("nan")}]  # a step logged twice keeps its newest value
    s = runs.series(records)
    assert sorted(s) == ["a"]
    np.testing.assert_array_equal(s["a"][0], [1, 2])
    np.testing.assert_array_equal(s["a"][1], [0.5, 2.0])


def test_run_names_are_short_and_distinct():
    assert runs.run_names(["/r/a/clip", "/r/b/clip/"]) == ["a/clip", "b/clip"]
    assert runs.run_names(["/r/clip", "/r/clus"]) == ["clip", "clus"]


def test_load_run_reads_metrics_and_the_newest_arrays(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(
        json.dumps({"step": 1, "train/loss": 2.0, "x/y": None}) + "\n"
        + json.dumps({"step": 4, "eval/seconds": 1.0}) + "\n")
    a = ClassArrays(classnames=["a", "b"], confusion=np.array([[1, 0], [0, 1]]),
                    per_class_accuracy=np.array([1.0, 1.0]), projection=np.zeros((2, 2), np.float32),
                    explained_variance=np.array([0.5, 0.5]), labels=np.array([0, 1]))
    for step, name in ((2, "old"), (4, "new")):
        artifacts.write(Evaluation(metrics={}, arrays={name: a}), artifacts.step_dir(str(tmp_path), step))
    run = runs.load_run(str(tmp_path), "r")
    assert run.eval_step == 4 and list(run.arrays) == ["new"]
    assert set(run.series) == {"train/loss"}
    assert run.logged == {"train/loss", "x/y", "eval/seconds"}


def test_a_directory_without_metrics_is_not_a_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="holds no metrics.jsonl"):
        runs.load_runs([str(tmp_path)])
