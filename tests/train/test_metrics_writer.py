"""metrics.jsonl survives a cut (a killed writer, a full disk): a resumed run's writer sets a cut last line aside
and appends on a fresh line; every reader (``read_metrics``, the report, the sweep, the methods benchmark) skips
a malformed line with a warning that names the file and the line, and keeps every complete record."""
import json
import os
import sys

import pytest

from clus_jax import sweep
from clus_jax.report import runs
from clus_jax.train.metrics_writer import METRICS_FILE, PARTIAL_SUFFIX, MetricWriter, read_metrics

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "bench"))
import methods  # noqa: E402

STEPS = (100, 200, 300, 400, 500, 600)


def _metrics(step: int) -> dict:
    """A record's values; ``seen/<step>`` shows, in any reader's keys, that the record was read."""
    return {"train/loss": 10.0 - step / 100, f"seen/{step}": 1.0}


def _seen(keys) -> list[int]:
    return sorted(int(k.split("/")[1]) for k in keys if k.startswith("seen/"))


# reader -> the steps whose records it read, through its own interface
READERS = {
    "read_metrics": lambda w: _seen(k for r in read_metrics(w) for k in r),
    "report": lambda w: _seen(runs.load_run(w, "run").logged),
    "sweep": lambda w: _seen(sweep.read_final_metrics(w)[0]),
    "methods": lambda w: _seen(methods.finished_metrics(w, STEPS[-1]) or {}),
}


def _log(workdir, steps) -> None:
    writer = MetricWriter(str(workdir))  # as train.loop builds it
    for step in steps:
        writer.write(step, _metrics(step))
    writer.close()


@pytest.mark.parametrize("reader", READERS)
def test_a_resumed_writer_sets_a_cut_last_line_aside_and_appends_on_a_fresh_line(tmp_path, caplog, reader):
    _log(tmp_path, STEPS[:-1])
    path = tmp_path / METRICS_FILE
    cut = json.dumps({"step": 600, **_metrics(600)})[:25]  # the writer was killed while writing step 600
    with open(path, "a") as f:
        f.write(cut)
    _log(tmp_path, [600, 700])  # the resumed run writes step 600 again, then 700

    lines = path.read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [*STEPS, 700]  # nothing appended onto the cut line
    assert (tmp_path / (METRICS_FILE + PARTIAL_SUFFIX)).read_text() == cut + "\n"  # set aside, not lost
    assert f"{path}: its last line was cut short" in caplog.text
    assert READERS[reader](str(tmp_path)) == [*STEPS, 700]


RECORD_100 = json.dumps({"step": 100, **_metrics(100)})


@pytest.mark.parametrize("text, steps, set_aside", [
    (RECORD_100, [100, 200], None),  # cut just before its newline: the record stays
    ('{"step": 50, "tr' + RECORD_100 + "\n", [100, 200], '{"step": 50, "tr\n'),  # appended onto a cut line
    ('{"step": 50, "tr' + RECORD_100[:-1], [200], '{"step": 50, "tr' + RECORD_100[:-1] + "\n"),  # both cut
], ids=["no newline", "appended onto a cut line", "both cut"])
def test_a_resumed_writer_keeps_a_complete_last_record(tmp_path, text, steps, set_aside):
    path = tmp_path / METRICS_FILE
    path.write_text(text)
    _log(tmp_path, [200])
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == steps
    partial = tmp_path / (METRICS_FILE + PARTIAL_SUFFIX)
    assert (partial.read_text() if partial.exists() else None) == set_aside


@pytest.mark.parametrize("reader", READERS)
def test_every_reader_skips_a_malformed_line_naming_the_file_and_line(tmp_path, caplog, reader):
    record = {s: json.dumps({"step": s, **_metrics(s)}) for s in STEPS}
    lines = [record[100], record[200],
             '{"step": 250, "train/lo' + record[300],  # an older writer appended onto a cut line: 300 is kept
             "\0\0\0\0",  # a full disk
             record[400], record[500], record[600],
             '{"step": 700, "train/loss": 3.0, "se']  # cut, not yet set aside by a writer
    path = tmp_path / METRICS_FILE
    path.write_text("\n".join(lines))
    assert READERS[reader](str(tmp_path)) == list(STEPS)
    warnings = [m for m in caplog.messages if "malformed line" in m]
    assert [m.split(": ", 1)[0] for m in warnings] == [f"{path}:3", f"{path}:4", f"{path}:8"]
    assert "kept the record at column 24" in warnings[0]
    assert all("\n" not in m for m in warnings)  # one line each
