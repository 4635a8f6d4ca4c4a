"""The per-evaluation array files: written and read back exactly, without pickle."""
import json

import numpy as np

from clus_jax.evaluate import artifacts
from clus_jax.evaluate.runner import ClassArrays, Evaluation


def test_write_then_read_round_trip(tmp_path):
    a = ClassArrays(classnames=["red circle", "blue ∆"], confusion=np.array([[3, 1], [0, 2]]),
                    per_class_accuracy=np.array([0.75, np.nan]), projection=np.array([[0.5, -1], [2, 0]], np.float32),
                    explained_variance=np.array([0.7, 0.2]), labels=np.array([0, 1]))
    workdir = str(tmp_path)
    artifacts.write(Evaluation(metrics={"zeroshot/s/top1": 0.5, "x": float("nan")}, arrays={"s": a}),
                    artifacts.step_dir(workdir, 40))
    artifacts.write(Evaluation(metrics={}, arrays={}), artifacts.step_dir(workdir, 8))
    (tmp_path / "eval" / "not_a_step").mkdir()
    assert artifacts.steps(workdir) == [8, 40]
    back = artifacts.read(artifacts.step_dir(workdir, 40))["s"]
    assert back.classnames == a.classnames
    for field in ("confusion", "per_class_accuracy", "projection", "explained_variance", "labels"):
        np.testing.assert_array_equal(getattr(back, field), getattr(a, field))
    assert back.projection.dtype == np.float32
    with np.load(tmp_path / "eval" / "step_40" / "confusion_s.npz", allow_pickle=False) as f:
        assert sorted(f.files) == ["classnames", "confusion", "per_class_accuracy"]
    assert json.loads((tmp_path / "eval" / "step_40" / "metrics.json").read_text()) == {"zeroshot/s/top1": 0.5, "x": None}
    assert artifacts.steps(str(tmp_path / "none")) == []
