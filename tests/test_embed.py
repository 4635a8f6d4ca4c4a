"""python -m clus_jax.embed: one row per record equal to clus_jax.load's encoders, resumable, split over processes."""
import io
import json
import os
import sys

import numpy as np
import host_limits  # registered by tests/conftest.py
import pytest
from PIL import Image

import clus_jax
from clus_jax import embed
from clus_jax.data import records as records_lib
from clus_jax.data import side_fields
from clus_jax.data.data_config import resolve_data_config
from clus_jax.config.run_config import load_run_config

pytestmark = pytest.mark.slow  # each command starts JAX and compiles the encoders (a few seconds)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The commands run on the eight fake devices of this process (tests/conftest.py), so that their encoders
# compile to the same per-device programs as the model loaded here and give bit-equal rows.
ENV = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
NUM_RECORDS = 37
INVALID = {5: "undecodable image", 9: "empty caption", 20: "corrupt record"}
SHARD, BATCH = 12, 8  # shards [0, 12), [12, 24), [24, 36), [36, 37); two batches a shard


def _png(rng, height, width):
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """An ArrayRecord file of images of several sizes with captions, three records of them unusable."""
    rng = np.random.default_rng(0)
    records = [{"image": _png(rng, int(rng.integers(12, 40)), int(rng.integers(12, 40))), "caption": f"a picture number {i}"}
               for i in range(NUM_RECORDS)]
    records[5]["image"] = b"not an image"
    records[9]["caption"] = "  "
    encoded = [records_lib.encode_record(r) for r in records]
    encoded[20] = b"\xc1 not msgpack"
    path = str(tmp_path_factory.mktemp("data") / "records.array_record")
    records_lib.write_array_record(path, encoded)
    return path, records


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny CLIP trained 2 steps through the CLI, which writes the run's config.json."""
    workdir = str(tmp_path_factory.mktemp("run"))
    cmd = [sys.executable, "-m", "clus_jax.train", "--config", "configs/clip.py:steps=2,batch=16,synthetic",
           "--workdir", workdir, "--config.model.image.size=mu", "--config.model.text.size=mu",
           "--config.model.image.image_size=16", "--config.model.text.context_length=8", "--config.model.embed_dim=32",
           "--config.evals.run=none", "--config.data.synthetic_size=64"]
    proc = host_limits.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, base_s=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return workdir


def _embed(run, data_path, out, *extra):
    cmd = [sys.executable, "-m", "clus_jax.embed", "--workdir", run, "--out", str(out), "--data.source=array_record",
           f"--data.path={data_path}", "--shard-size", str(SHARD), "--batch-size", str(BATCH), *extra]
    proc = host_limits.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, base_s=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


def _read(out):
    """Every field of an embedding directory, shards concatenated in manifest order."""
    manifest = json.loads((out / side_fields.MANIFEST).read_text())
    return manifest, {field: np.concatenate([np.load(out / s["files"][field]) for s in manifest["shards"]])
                      for field in manifest["fields"]}


@pytest.fixture(scope="module")
def embedded(run, data, tmp_path_factory):
    out = tmp_path_factory.mktemp("embeddings")
    summary, stderr = _embed(run, data[0], out)
    return out, summary, stderr


def test_one_row_per_record_equal_to_the_models_encoders(run, data, embedded):
    out, summary, stderr = embedded
    manifest, fields = _read(out)
    assert manifest["num_records"] == NUM_RECORDS and summary["complete"]
    assert [(s["start"], s["end"]) for s in manifest["shards"]] == side_fields.shard_ranges(NUM_RECORDS, SHARD)
    assert manifest["fields"]["image_emb"] == {"shape": [32], "dtype": "float32"}
    assert manifest["fields"]["index"] == {"shape": [], "dtype": "int64"}
    np.testing.assert_array_equal(fields["index"], np.arange(NUM_RECORDS))
    assert summary["invalid"] == len(INVALID) and sorted(np.flatnonzero(~fields["valid"])) == sorted(INVALID)
    assert "warning: record 20 could not be read" in stderr
    assert f"embed: {NUM_RECORDS}/{NUM_RECORDS} records (100%)" in stderr

    model = clus_jax.load(run, batch_size=BATCH)
    valid = [i for i in range(NUM_RECORDS) if i not in INVALID]
    records = data[1]
    np.testing.assert_array_equal(fields["image_emb"][valid], model.encode_image([records[i]["image"] for i in valid]))
    np.testing.assert_array_equal(fields["text_emb"][valid], model.encode_text([records[i]["caption"] for i in valid]))
    for i in INVALID:
        assert not fields["image_emb"][i].any() and not fields["text_emb"][i].any()


def test_the_side_file_reader_reads_the_output(embedded):
    out = embedded[0]
    manifest, fields = _read(out)
    assert manifest == side_fields.manifest(side_fields.field_specs(out), side_fields.shard_ranges(NUM_RECORDS, SHARD))
    reader = side_fields.open_side_field(out, "image_emb", NUM_RECORDS)
    np.testing.assert_array_equal(reader[30], fields["image_emb"][30])


def test_a_rerun_skips_complete_shards_and_redoes_a_missing_one(run, data, embedded, tmp_path):
    out = embedded[0]
    _, before = _read(out)
    summary, stderr = _embed(run, data[0], out)
    assert summary["skipped_shards"] == 4 and summary["embedded"] == 0 and "4 of 4 shards already complete" in stderr
    (out / "text_emb-00001.npy").unlink()
    summary, _ = _embed(run, data[0], out)
    assert summary["skipped_shards"] == 3 and summary["embedded"] == SHARD and summary["complete"]
    _, after = _read(out)
    for field in before:
        np.testing.assert_array_equal(after[field], before[field])


def test_two_processes_write_disjoint_ranges_that_cover_every_record(run, data, embedded, tmp_path):
    out = tmp_path / "split"
    first, _ = _embed(run, data[0], out, "--process-index", "0", "--process-count", "2")
    assert not first["complete"] and not (out / side_fields.MANIFEST).exists()
    written_by_first = sorted(p.name for p in out.glob("index-*.npy"))
    second, _ = _embed(run, data[0], out, "--process-index", "1", "--process-count", "2")
    assert second["complete"] and first["records"] + second["records"] == NUM_RECORDS
    assert written_by_first == ["index-00000.npy", "index-00001.npy"]  # records [0, 24); the second did [24, 37)
    _, split = _read(out)
    _, whole = _read(embedded[0])
    for field in whole:
        np.testing.assert_array_equal(split[field], whole[field])


def test_another_embedding_into_the_same_directory_is_refused(run, data, embedded):
    cmd = [sys.executable, "-m", "clus_jax.embed", "--workdir", run, "--out", str(embedded[0]), "--modality", "image",
           "--data.source=array_record", f"--data.path={data[0]}", "--shard-size", str(SHARD)]
    proc = host_limits.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, base_s=600)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert "holds embeddings of something else" in proc.stderr and "modality" in proc.stderr


@pytest.mark.parametrize("args, named", [
    (["--modality", "image,audio"], "--modality='image,audio'"),
    (["--data.sourse=synthetic"], "did you mean 'source'?"),
    (["--data.synthetic_size=many"], "--data.synthetic_size=many"),
    (["--process-index", "2", "--process-count", "2"], "--process-index=2"),
    (["--bogus"], "'--bogus'"),
], ids=["modality", "data-key", "data-value", "process-index", "unknown-flag"])
def test_bad_arguments_print_one_line(run, args, named, tmp_path):
    cmd = [sys.executable, "-m", "clus_jax.embed", "--workdir", run, "--out", str(tmp_path / "o"), *args]
    proc = host_limits.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, base_s=600)
    lines = proc.stderr.splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-2000:]
    assert named in lines[0]


def test_an_open_clip_checkpoint_embeds_as_its_loaded_encoders(tmp_path):
    """--workdir OPEN_CLIP (a random open_clip model folder, 24 wide): one row per record equal to
    interop.load_open_clip's image encoder on the same records, which start from config.base's default data
    (here made synthetic); its embed.json says which encoder. --step, which it has none of, is one line."""
    from clus_jax.data.sources import make_source
    from clus_jax.interop import load_open_clip

    teacher, out = os.path.join(REPO, "tests", "interop", "vectors", "options"), tmp_path / "oc"
    data = ["--data.source=synthetic", "--data.synthetic_size=20"]
    cmd = [sys.executable, "-m", "clus_jax.embed", "--workdir", teacher, "--out", str(out), "--modality", "image",
           "--shard-size", str(SHARD), "--batch-size", str(BATCH), *data]
    proc = host_limits.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, base_s=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest, fields = _read(out)
    assert manifest["fields"]["image_emb"] == {"shape": [24], "dtype": "float32"} and fields["valid"].all()
    spec = json.loads((out / embed.SPEC_FILE).read_text())
    assert spec["encoder"] == "open_clip" and spec["workdir"] == teacher and spec["step"] is None
    source = make_source(resolve_data_config({"source": "synthetic", "synthetic_size": 20}))
    model = load_open_clip(teacher, batch_size=BATCH)
    np.testing.assert_array_equal(fields["image_emb"], model.encode_image([source[i]["image"] for i in range(20)]))
    proc = host_limits.run([*cmd[:-2], "--step", "3"], cwd=REPO, env=ENV, capture_output=True, text=True, base_s=600)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "--step 3" in proc.stderr, proc.stderr[-2000:]


def test_a_missing_run_prints_one_line(tmp_path):
    cmd = [sys.executable, "-m", "clus_jax.embed", "--workdir", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]
    proc = host_limits.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, base_s=600)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1 and "no config.json" in proc.stderr


def test_the_default_data_is_the_runs_training_data(run):
    data = load_run_config(run).data
    assert embed.data_config_with(data, []).to_dict() == resolve_data_config(data).to_dict()
    changed = embed.data_config_with(data, [("source", "tar"), ("path", "x-*.tar"), ("synthetic_size", "12")])
    assert (changed.source, changed.path, changed.synthetic_size) == ("tar", "x-*.tar", 12)

