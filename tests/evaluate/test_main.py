"""``python -m clus_jax.evaluate``'s flags: ``--evals`` replaces the run's ``config.evals.run`` or names a suite
file, and is checked before any weight is read, as ``--out`` and an open_clip source's flags are; every mistake is
one error line and leaves the user's files alone (the re-evaluation itself: tests/report/test_main.py, which
shares its training run; suites on a run and on an open_clip checkpoint: tests/train/test_reevaluate_suites.py)."""
import os

import pytest

from clus_jax.config.run_config import save_run_config
from clus_jax.evaluate import __main__ as evaluate_main

import snapshots  # registered by tests/conftest.py
import train_helpers as helpers  # registered by tests/conftest.py

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# tests/test_interop.py's random open_clip models: a folder with open_clip_config.json, and a bare weights file
OPEN_CLIP = os.path.join(REPO, "tests", "interop", "vectors", "options")
OPEN_CLIP_WEIGHTS = os.path.join(REPO, "tests", "interop", "vectors", "quickgelu", "open_clip_model.safetensors")


def run_without_checkpoint(tmp_path):
    workdir = str(tmp_path / "run")
    save_run_config(workdir, helpers.tiny_config("clip"))
    return workdir


@pytest.mark.parametrize("flags,message", [
    (["--evals", "embedded,nope"], "error: config.evals.run='embedded,nope': no entry config.evals.<name> for "
                                   "['nope']; entries: ['embedded']"),
    (["--batch-size", "0"], "error: --batch-size=0 must be at least 1"),
])
def test_a_bad_flag_is_one_error_line(tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as e:
        evaluate_main.main([run_without_checkpoint(tmp_path), *flags])
    assert e.value.code in (1, 2)
    assert capsys.readouterr().err.strip() == message


def test_evals_reaches_the_reevaluation(tmp_path, monkeypatch):
    import clus_jax.train.reevaluate as reevaluate

    seen = {}

    def fake(source, step, *, batch_size, append, evals, out, model_config):
        seen.update(source=source, step=step, batch_size=batch_size, append=append, evals=evals, out=out,
                    model_config=model_config)
        return 3, {}

    monkeypatch.setattr(reevaluate, "reevaluate", fake)
    evaluate_main.main(["w", "--step", "3", "--evals", "a,b", "--no-append", "--out", "o", "--model-config", "c"])
    assert seen == {"source": "w", "step": 3, "batch_size": None, "append": False, "evals": "a,b", "out": "o",
                    "model_config": "c"}


def write(path, text):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
    return path


# (arguments, expected error line); {run}: a run's workdir without checkpoint, {tmp}: the test's folder.
SUITE_ROWS = {
    "missing suite": (["{run}", "--evals", "{tmp}/nope.py"],
                      "error: --evals {tmp}/nope.py: config file '{tmp}/nope.py' does not exist"),
    "no get_config": (["{run}", "--evals", "{tmp}/suites/plain.py"],
                      "error: --evals {tmp}/suites/plain.py: {tmp}/suites/plain.py defines no get_config() "
                      "(returning the suite's entries)"),
    "no entry": (["{run}", "--evals", "{tmp}/suites/empty.py"],
                 "error: --evals {tmp}/suites/empty.py: get_config() of {tmp}/suites/empty.py returned no entry "
                 "(a ConfigDict of {{name: {{'type': <evaluator>, ...}}}})"),
    "bad argument": (["{run}", "--evals", "{shapes}:many"],
                     "error: --evals {shapes}:many: the argument is a number of images, not 'many'"),
    "entry failing the check": (["{run}", "--evals", "{tmp}/suites/bad.py"],
                                "error: --evals {tmp}/suites/bad.py: config.evals.mine.k=0 must be an integer >= 1"),
    "open_clip without --out": ([OPEN_CLIP, "--evals", "{shapes}"],
                                f"error: --out: {OPEN_CLIP} is an open_clip checkpoint, which has no workdir to "
                                "write into; pass --out DIR"),
    "weights without --model-config": ([OPEN_CLIP_WEIGHTS, "--out", "{tmp}/out"],
                                       f"error: --model-config: {OPEN_CLIP_WEIGHTS} is a weights file; pass its "
                                       "open_clip model config (e.g. open_clip's model_configs/ViT-B-32.json)"),
    "--step of open_clip": ([OPEN_CLIP, "--step", "3", "--out", "{tmp}/out"],
                            f"error: --step 3: {OPEN_CLIP} is an open_clip checkpoint, which has no steps"),
    "--model-config of a run": (["{run}", "--model-config", "{tmp}/cfg.json"],
                                "error: --model-config {tmp}/cfg.json: {run} is a clus_jax run, which has its own "
                                "config"),
    "--out not empty": (["{run}", "--evals", "{shapes}", "--out", "{tmp}/suites"],
                        "error: --out {tmp}/suites is not empty; pass a new or empty folder for the evaluation's "
                        "files"),
}


@pytest.mark.parametrize("row", SUITE_ROWS)
def test_a_bad_suite_or_source_is_one_error_line_and_changes_nothing(tmp_path, capsys, row):
    write(str(tmp_path / "suites" / "plain.py"), "ENTRIES = {}\n")
    write(str(tmp_path / "suites" / "empty.py"), "def get_config(arg=None):\n    return {'run': ''}\n")
    write(str(tmp_path / "suites" / "bad.py"), "def get_config(arg=None):\n"
          "    return {'mine': {'type': 'knn', 'data': 'synthetic:8', 'train_data': 'synthetic:8', 'k': 0}}\n")
    names = {"run": run_without_checkpoint(tmp_path), "tmp": str(tmp_path),
             "shapes": os.path.join(REPO, "configs", "evals", "shapes.py")}
    args, message = SUITE_ROWS[row]
    before = snapshots.snapshot(str(tmp_path))
    with pytest.raises(SystemExit) as e:
        evaluate_main.main([a.format(**names) for a in args])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip() == message.format(**names)
    assert snapshots.snapshot(str(tmp_path)) == before
