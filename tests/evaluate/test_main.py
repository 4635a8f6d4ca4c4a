"""``python -m clus_jax.evaluate``'s flags: ``--evals`` replaces the run's ``config.evals.run`` and is checked
before any weight is read (the re-evaluation itself: tests/report/test_main.py, which shares its training run)."""
import pytest

from clus_jax.config.run_config import save_run_config
from clus_jax.evaluate import __main__ as evaluate_main

import train_helpers as helpers  # registered by tests/conftest.py


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

    def fake(workdir, step, *, batch_size, append, evals):
        seen.update(workdir=workdir, step=step, batch_size=batch_size, append=append, evals=evals)
        return 3, {}

    monkeypatch.setattr(reevaluate, "reevaluate", fake)
    evaluate_main.main(["w", "--step", "3", "--evals", "a,b", "--no-append"])
    assert seen == {"workdir": "w", "step": 3, "batch_size": None, "append": False, "evals": "a,b"}
