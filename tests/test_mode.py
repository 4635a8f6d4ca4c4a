"""MoDE end to end: caption embeddings by MiniLM (clus_jax.embed --encoder minilm), expert subsets from the
nearest fine centre (clus_jax.experts), the ensemble evaluator's figures (clus_jax.ensemble) and
the recipe (configs/mode.py), including an expert added to a finished run. Oracles are NumPy
transcriptions of MoDE's steps (brute-force nearest centre, sum_k w_k cos_k logits, recall by rank)."""
from __future__ import annotations

import json
import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import host_limits  # registered by tests/conftest.py
import pytest
import tolerances  # registered by tests/conftest.py
import train_helpers as helpers

from clus_jax import embed, experts
from clus_jax.config import base as config_base
from clus_jax.clustering import mode_ensemble, outputs
from clus_jax.clustering.expert_subsets import FINE_IDS_FILE, subset_file
from clus_jax.data import side_fields, transforms
from clus_jax.data.sources import make_source
from clus_jax import ensemble
from clus_jax.data.eval_sets import ClassificationSet, RetrievalSet

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _write_embeddings(path, rows, valid, shard=7):
    """A side file as clus_jax.embed writes it: text_emb, index and valid in shards of ``shard``."""
    arrays = {"text_emb": rows.astype(np.float32), "index": np.arange(len(rows), dtype=np.int64), "valid": valid}
    side_fields.write_side_file(path, arrays, shard_size=shard)


def _write_clusters(path, fine, coarse, fine_to_coarse, trained_assignments):
    """What clus_jax.cluster --levels writes, under the names the later stages read."""
    os.makedirs(path, exist_ok=True)
    np.save(os.path.join(path, side_fields.CENTERS_FILE), fine.astype(np.float32))
    np.save(os.path.join(path, side_fields.COARSE_CENTERS_FILE), coarse.astype(np.float32))
    np.save(os.path.join(path, side_fields.FINE_TO_COARSE_FILE), fine_to_coarse.astype(np.int32))
    np.save(os.path.join(path, outputs.ASSIGNMENTS_FILE), trained_assignments.astype(np.int32))
    with open(os.path.join(path, outputs.SUMMARY_FILE), "w") as f:
        json.dump({"metric": "euclidean"}, f)


@pytest.fixture
def hierarchy(tmp_path):
    """60 records (4 without an embedding) of width 8 around 6 fine centres in 3 coarse groups; the
    features are not unit length and the centres shorter than 1, so the assignment must normalise the
    features first."""
    rng = np.random.default_rng(3)
    fine = _unit(rng.normal(size=(6, 8))) * rng.uniform(0.3, 0.9, (6, 1))  # k-means centres of unit rows: shorter
    fine_to_coarse = np.array([0, 1, 2, 0, 1, 2])
    rows = (fine[rng.integers(0, 6, 60)] + 0.6 * rng.normal(size=(60, 8))) * rng.uniform(0.2, 3.0, (60, 1))
    valid = np.ones(60, bool)
    valid[[5, 17, 18, 41]] = False
    rows[~valid] = 0.0
    emb, clusters = tmp_path / "emb", tmp_path / "clusters"
    _write_embeddings(emb, rows, valid)
    # what a balanced k-means leaves in assignments.npy: not the nearest centre (MoDE's experts must not use it)
    _write_clusters(clusters, fine, rng.normal(size=(3, 8)), fine_to_coarse, rng.integers(0, 6, 60))
    return dict(emb=str(emb), clusters=str(clusters), rows=rows, valid=valid, fine=fine,
                fine_to_coarse=fine_to_coarse)


def _oracle_experts(h):
    """NumPy: nearest fine centre (euclidean, unit features) of each valid record -> its expert."""
    x = _unit(h["rows"][h["valid"]])
    d = ((x[:, None, :] - h["fine"][None]) ** 2).sum(-1)
    expert = h["fine_to_coarse"][d.argmin(1)]
    records = np.flatnonzero(h["valid"])
    return [records[expert == c] for c in range(3)], records, d.argmin(1)


def test_expert_subsets_are_the_records_of_each_nearest_fine_centre(hierarchy, tmp_path):
    out = tmp_path / "subsets"
    summary = experts.run(experts.parse_args(["--features", hierarchy["emb"], "--clusters", hierarchy["clusters"],
                                              "--out", str(out), "--ooc-ratio", "0"]))
    inside, records, fine_ids = _oracle_experts(hierarchy)
    assert summary["num_experts"] == 3 and summary["metric"] == "euclidean"
    for c in range(3):
        np.testing.assert_array_equal(np.load(out / subset_file(c)), inside[c])
    by_record = np.load(out / FINE_IDS_FILE)
    np.testing.assert_array_equal(by_record[records], fine_ids)
    assert (by_record[~hierarchy["valid"]] == -1).all()


def test_out_of_cluster_records_are_a_seeded_draw_of_the_others(hierarchy, tmp_path):
    args = ["--features", hierarchy["emb"], "--clusters", hierarchy["clusters"], "--ooc-ratio", "0.25"]
    experts.run(experts.parse_args([*args, "--out", str(tmp_path / "a")]))
    experts.run(experts.parse_args([*args, "--out", str(tmp_path / "b")]))
    experts.run(experts.parse_args([*args, "--out", str(tmp_path / "c"), "--seed", "1"]))
    inside, records, _ = _oracle_experts(hierarchy)
    differs = False
    for c in range(3):
        a = np.load(tmp_path / "a" / subset_file(c))
        np.testing.assert_array_equal(a, np.load(tmp_path / "b" / subset_file(c)))
        others = np.setdiff1d(records, inside[c])
        extra = np.setdiff1d(a, inside[c])
        assert set(inside[c]) <= set(a) and set(extra) <= set(others)  # never a record without an embedding
        assert len(extra) == int(0.25 * len(others)) and len(a) == len(np.unique(a))
        differs |= not np.array_equal(a, np.load(tmp_path / "c" / subset_file(c)))
    assert differs


def test_expert_arguments_fail_with_one_line(hierarchy, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        experts.main(["--features", hierarchy["emb"], "--clusters", str(tmp_path / "nope"), "--out", str(tmp_path)])
    lines = capsys.readouterr().err.splitlines()
    assert e.value.code == 1 and len(lines) == 1 and side_fields.CENTERS_FILE in lines[0], lines
    with pytest.raises(SystemExit) as e:
        experts.parse_args(["--features", "a", "--clusters", "b", "--out", "c", "--ooc-ratio", "1.5"])
    lines = capsys.readouterr().err.splitlines()
    assert e.value.code == 2 and len(lines) == 1 and "--ooc-ratio=1.5" in lines[0], lines


# --- the ensemble evaluator ------------------------------------------------------------------------------

def _toy_sets(rng):
    classify = ClassificationSet(name="toy", images=np.zeros((30, 2, 2, 3), np.uint8),
                                 labels=rng.integers(0, 5, 30), classnames=list("abcde"), templates=["{}"])
    retrieve = RetrievalSet(name="pairs", images=np.zeros((12, 2, 2, 3), np.uint8), captions=[str(i) for i in range(20)],
                            caption_to_image=np.concatenate([np.arange(12), rng.integers(0, 12, 8)]))
    return classify, retrieve


def _toy_outputs(rng, num_models):
    return [{"toy": ensemble.SetOutputs(_unit(rng.normal(size=(30, 6))), _unit(rng.normal(size=(5, 6)))),
             "pairs": ensemble.SetOutputs(_unit(rng.normal(size=(12, 6))), _unit(rng.normal(size=(20, 6))))}
            for _ in range(num_models)]


def _oracle_rows(outputs, classify, retrieve, w_zs, w_t2i, w_i2t):
    """NumPy: logits sum_k w_k <a_k, b_k>, then top-1 accuracy and recall@k from ranks."""
    logits = sum(w * (o["toy"].images @ o["toy"].texts.T) for w, o in zip(w_zs, outputs))
    class_rank = (logits > logits[np.arange(len(logits)), classify.labels][:, None]).sum(1)
    out = {f"zeroshot/toy/top{k}": float(np.mean(class_rank < k)) for k in (1, 5)}
    c2i = retrieve.caption_to_image
    t2i = sum(w_t2i[:, k:k + 1] * (o["pairs"].texts @ o["pairs"].images.T) for k, o in enumerate(outputs))  # [M, N]
    i2t = sum(w * (o["pairs"].images @ o["pairs"].texts.T) for w, o in zip(w_i2t, outputs))  # [N, M]
    t2i_rank = (t2i > t2i[np.arange(len(c2i)), c2i][:, None]).sum(1)
    i2t_rank = np.array([min((i2t[n] > i2t[n, m]).sum() for m in np.flatnonzero(c2i == n)) for n in range(12)])
    for k in (1, 5, 10):
        out[f"retrieval/pairs/t2i_r{k}"] = float(np.mean(t2i_rank < k))
        out[f"retrieval/pairs/i2t_r{k}"] = float(np.mean(i2t_rank < k))
    return out


def test_ensemble_rows_equal_numpy_mixtures_of_cosine_logits():
    rng = np.random.default_rng(0)
    classify, retrieve = _toy_sets(rng)
    outputs = _toy_outputs(rng, 3)
    w_zs, w_i2t = np.array([0.6, 0.1, 0.3]), np.array([0.2, 0.5, 0.3])
    w_t2i = rng.dirichlet(np.ones(3), size=20)
    routing = ensemble.Routing({"toy": w_zs}, {"pairs": w_t2i}, {"pairs": w_i2t})
    rows = ensemble.report_rows(outputs[:3], [0, 1, 2], [classify, retrieve], routing, baseline=outputs[0])
    assert list(rows) == ["expert_0", "expert_1", "expert_2", "best_expert", "uniform", "ensemble", "baseline"]
    ones, third = np.ones(1), np.full(3, 1 / 3)
    # The figures are fractions of rank counts: approx absorbs their float64 rounding only, the ranks must agree.
    for c in range(3):
        expect = _oracle_rows([outputs[c]], classify, retrieve, ones, np.ones((20, 1)), ones)
        assert rows[f"expert_{c}"] == pytest.approx({k: expect[k] for k in rows[f"expert_{c}"]})
    for key, value in rows["best_expert"].items():
        assert value == max(rows[f"expert_{c}"][key] for c in range(3))
    uniform = _oracle_rows(outputs, classify, retrieve, third, np.full((20, 3), 1 / 3), third)
    assert rows["uniform"] == pytest.approx({k: uniform[k] for k in rows["uniform"]})
    mixed = _oracle_rows(outputs, classify, retrieve, w_zs, w_t2i, w_i2t)
    assert rows["ensemble"] == pytest.approx({k: mixed[k] for k in rows["ensemble"]})
    assert rows["ensemble"] != rows["uniform"]
    assert rows["baseline"] == rows["expert_0"]


def _routing_rtol(embeddings, fine, temperature, error, per_query=False):
    """Relative bound on MoDE's weights, kept experts renormalised, when the float32 embeddings they come from
    are within ``error`` (in norm) of the test's float64 ones, with the same nearest centres: a distance d moves
    by at most ``error``, a score term exp((a - d) b) by the factor exp(+-b error), the softmax inputs w / T by
    at most delta = b error max_k w_k / T, the softmax by 2 delta and the renormalised weights by 4 delta."""
    n = 1 if per_query else len(embeddings)
    a = np.exp(0.5 - np.sqrt(n)) if n < 10 else 0.0
    b = mode_ensemble.SHARPNESS * np.log10(max(10, n - mode_ensemble.TOO_MANY_CLASSES))
    terms = np.exp((a - mode_ensemble.nearest_centers(embeddings, fine)[1]) * b)
    return 4 * b * error * (terms.max() if per_query else terms.sum()) / temperature


def _unit_error(dim, templates=1, mean_norm=1.0):
    """Bound on the norm of float32 - float64 of a unit vector made in float32 from a float64 one. Per
    coordinate (|e_i| <= 1): the input's cast (2u once normalised), the norm (gamma(D) / 2 + u), the division
    (u) and the float32 cast of the test's vector (u), below gamma(D + 4) together. Averaging ``templates``
    such rows adds gamma(templates + 1); normalising the average (length ``mean_norm``) multiplies that by at
    most 2 / mean_norm."""
    unit = tolerances.gamma(dim + 4)
    if templates == 1:
        return np.sqrt(dim) * unit
    return np.sqrt(dim) * (unit + 2 * (unit + tolerances.gamma(templates + 1)) / mean_norm)


def test_routing_weighs_the_trained_experts_by_the_class_names_nearest_fine_centres():
    rng = np.random.default_rng(1)
    classify, retrieve = _toy_sets(rng)
    classify.templates = ["{}", "a {}"]
    fine = _unit(rng.normal(size=(8, 4)))
    fine_to_coarse = np.array([0, 1, 2, 3, 0, 1, 2, 3])
    table = {}

    def encode(texts):  # a caption encoder: a fixed random vector per text, not unit length
        return np.stack([table.setdefault(t, rng.normal(size=4) * 3.0) for t in texts])

    routing = ensemble.metadata_routing([classify, retrieve], encode, fine, fine_to_coarse, 4, [2, 0])
    # NumPy: prompts normalised, averaged over templates, normalised; MoDE's weights over all 4 clusters,
    # then experts 2 and 0 (in that order) renormalised
    prompts = np.stack([[_unit(encode([t.replace("{}", c)])[0]) for t in classify.templates]
                        for c in classify.classnames])
    classes = _unit(prompts.mean(1))
    # The routing's class and caption embeddings are float32 (_unit_error); the weights follow (_routing_rtol).
    class_error = _unit_error(4, len(classify.templates), np.linalg.norm(prompts.mean(1), axis=1).min())
    w = mode_ensemble.mode_ensemble_weights(classes, fine, fine_to_coarse, 4)
    rtol = _routing_rtol(classes, fine, mode_ensemble.TEMPERATURE, class_error)
    np.testing.assert_allclose(routing.zeroshot["toy"], w[[2, 0]] / w[[2, 0]].sum(), rtol=rtol)
    captions = _unit(encode(retrieve.captions))
    q = mode_ensemble.retrieval_weights(captions, fine, fine_to_coarse, 4)[:, [2, 0]]
    rtol = _routing_rtol(captions, fine, mode_ensemble.TEMPERATURE, _unit_error(4), per_query=True)
    np.testing.assert_allclose(routing.t2i["pairs"], q / q.sum(1, keepdims=True), rtol=rtol)
    corpus = mode_ensemble.mode_ensemble_weights(captions, fine, fine_to_coarse, 4)[[2, 0]]
    rtol = _routing_rtol(captions, fine, mode_ensemble.TEMPERATURE, _unit_error(4))
    np.testing.assert_allclose(routing.i2t["pairs"], corpus / corpus.sum(), rtol=rtol)
    sharp = ensemble.metadata_routing([classify], encode, fine, fine_to_coarse, 4, [2, 0], temperature=0.5)
    w = mode_ensemble.mode_ensemble_weights(classes, fine, fine_to_coarse, 4, temperature=0.5)
    rtol = _routing_rtol(classes, fine, 0.5, class_error)
    np.testing.assert_allclose(sharp.zeroshot["toy"], w[[2, 0]] / w[[2, 0]].sum(), rtol=rtol)
    assert rtol < 1e-3  # unnormalised prompts or another expert order move the weights by 1e-2 and more


# --- caption embeddings by MiniLM ---------------------------------------------------------------------

def test_embed_with_minilm_gives_sentence_embeddings_of_the_cleaned_captions(tmp_path):
    from clus_jax.models import minilm

    out = tmp_path / "captions"
    args, overrides = embed.parse_args(["--encoder", "minilm", "--out", str(out), "--shard-size", "9",
                                        "--data.source=synthetic", "--data.synthetic_size=20"])
    summary = embed.run(args, overrides)
    assert summary["complete"] and summary["num_records"] == 20
    with open(out / side_fields.MANIFEST) as f:
        manifest = json.load(f)
    assert sorted(manifest["fields"]) == ["index", "text_emb", "valid"]
    assert json.loads((out / embed.SPEC_FILE).read_text())["encoder"] == "minilm"
    rows = np.concatenate([np.load(out / s["files"]["text_emb"]) for s in manifest["shards"]])
    data = config_base.base_config().data
    data.source, data.synthetic_size = "synthetic", 20
    source = make_source(data)
    captions = [transforms.clean_caption(source[i]["caption"]) for i in range(20)]
    # Bitwise: embed encodes each shard of 9 in one call (batch 256), so this runs the same program on the same
    # captions; all 20 in one call would pad otherwise (another program, equal only up to rounding).
    want = np.concatenate([minilm.encode_captions(captions[s:s + 9], embed.MINILM_BATCH_SIZE) for s in range(0, 20, 9)])
    np.testing.assert_array_equal(rows, want)
    assert rows.shape == (20, 384)


@pytest.mark.parametrize("args, named", [
    (["--encoder", "minilm", "--modality", "image,text"], "--encoder minilm embeds captions only"),
    ([], "--workdir is required"),
], ids=["minilm-images", "no-workdir"])
def test_embed_encoder_arguments_fail_with_one_line(args, named, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        embed.parse_args(["--out", str(tmp_path / "o"), *args])
    lines = capsys.readouterr().err.splitlines()
    assert e.value.code == 2 and len(lines) == 1 and named in lines[0], lines


# --- the recipe ----------------------------------------------------------------------------------------

def _tiny_overrides():
    """tests/train/helpers.py's tiny CLIP, as train-stage overrides (what differs from base_config; the
    parameter groups, a list, cannot be a command-line override and keep the default)."""
    tiny = helpers.tiny_config("clip", checkpoint_every=0, log_every=1).to_dict()
    base = config_base.base_config().to_dict()
    flat = {}

    def walk(a, b, prefix):
        for key, value in a.items():
            if isinstance(value, dict):
                walk(value, b[key], f"{prefix}{key}.")
            elif value != b.get(key) and key not in ("total_steps", "batch_size", "objectives", "param_groups"):
                flat[prefix + key] = value
    walk(tiny, base, "")
    return {**flat, "data.synthetic_size": 48}


def test_the_recipe_seed_covers_the_papers_share_and_the_experts_resume_it():
    """Defaults: the seed stops at 292 of a 346-step schedule (84%, MoDE's 27 of 32 epochs), each expert
    resumes it (init_from.mode='resume') to 346 with checkpoints of its own, the coarse level is balanced, and
    the dense baseline has the same 400 steps; a stage's config has the seed's schedule."""
    mode = config_base.load_config_module(str(ROOT / "configs" / "mode.py"))
    stages = {s.name: s for s in mode.get_recipe()}
    assert stages["seed"].train.endswith(":steps=292,batch=128,schedule=346")
    assert 292 / 346 == pytest.approx(27 / 32, abs=0.001)
    for c in (0, 1):
        expert = stages[f"expert_{c}"]
        assert expert.train.endswith(":steps=346,batch=128")
        assert expert.overrides["init_from.mode"] == "resume" and expert.overrides["init_from.path"] == "{seed}"
        assert expert.overrides["checkpoint_every"] == 27  # within 292 -> 346
    assert "--balanced-coarse" in stages["clusters"].args and "dense_400" in stages
    seed = config_base.load_config(stages["seed"].train)
    expert = config_base.load_config(stages["expert_0"].train)
    assert (seed.total_steps, seed.optim.schedule_steps) == (292, 346)
    assert (expert.total_steps, expert.optim.schedule_steps) == (346, 0)
    assert seed.optim.to_dict() == {**expert.optim.to_dict(), "schedule_steps": 346}  # one schedule
    earlier = {s.name: s for s in mode.get_recipe("resume=0,balanced_coarse=0,seed_steps=150,expert_steps=125")}
    assert earlier["seed"].train.endswith(":steps=150,batch=128")
    assert earlier["expert_0"].train.endswith(":steps=125,batch=128")
    assert "init_from.mode" not in earlier["expert_0"].overrides and "--balanced-coarse" not in earlier["clusters"].args
    with pytest.raises(ValueError, match="balanced_coarse needs coarse=4 to divide fine=110"):
        mode.get_recipe("coarse=4")


RECIPE = '''
from clus_jax.config.base import load_config_module

mode = load_config_module({mode!r})

def get_recipe(arg):
    return mode.mode_stages(fine=4, coarse=2, experts=int(arg), seed_steps=3, expert_steps=2, batch=16,
                            dense=False, iters=2, train_overrides={overrides!r},
                            data_args=["--data.source=synthetic", "--data.synthetic_size=48"],
                            eval_args=["--batch-size", "64"], config_path={mode!r})
'''


@pytest.mark.slow
def test_an_expert_added_to_a_finished_mode_run_trains_only_the_new_one(tmp_path):
    spec = tmp_path / "tiny_mode.py"
    spec.write_text(RECIPE.format(mode=str(ROOT / "configs" / "mode.py"), overrides=_tiny_overrides()))
    work = tmp_path / "mode"

    def recipe(n):
        cmd = [sys.executable, "-m", "clus_jax.recipe", "--config", f"{spec}:{n}", "--workdir", str(work)]
        proc = host_limits.run(cmd, cwd=ROOT, capture_output=True, text=True, base_s=900)
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
        return proc.stdout

    recipe(1)
    done = ("captions", "clusters", "subsets", "seed", "expert_0")
    first = {d: os.path.getmtime(work / d / "stage_done.json") for d in done}
    rows = json.loads((work / "ensemble_1" / "ensemble.json").read_text())["rows"]
    assert [r for r in rows if r.startswith("expert_")] == ["expert_0"]
    log = recipe(2)
    ran = re.findall(r"recipe: stage (\S+) \(\d+/\d+\): running", log)
    assert ran == ["expert_1", "ensemble_2"], log
    for d, mtime in first.items():
        assert os.path.getmtime(work / d / "stage_done.json") == mtime, f"{d} ran again"
    result = json.loads((work / "ensemble_2" / "ensemble.json").read_text())
    assert [r for r in result["rows"] if r.startswith("expert_")] == ["expert_0", "expert_1"]
    assert len(result["weights"]["zeroshot"]["easyvqa"]) == 2
    # the new expert continued from the seed on its own subset
    config = json.loads((work / "expert_1" / "config.json").read_text())
    assert config["init_from"]["path"] == str(work / "seed")
    assert config["data"]["subset"] == str(work / "subsets" / subset_file(1))
    # ... resuming its step, optimizer and schedule: its own steps are 4 and 5 of the seed's 5-step schedule
    assert config["init_from"]["mode"] == "resume" and config["total_steps"] == 5
    steps = [json.loads(line)["step"] for line in open(work / "expert_1" / "metrics.jsonl")]
    assert min(steps) == 4 and max(steps) == 5, steps
