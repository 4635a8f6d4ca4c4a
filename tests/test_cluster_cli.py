"""python -m clus_jax.cluster on the embeddings that clus_jax.embed makes of the embedded dataset with a tiny
CLIP run: two levels, top-8 labels in a side file that a training run joins as a batch field row by row, an
interrupted clustering that resumes to the same centres, and one-line errors.

The oracles are NumPy: nearest centres by brute force in float64, sizes, inertia and purity by hand."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import host_limits  # registered by tests/conftest.py
import pytest
import tolerances  # registered by tests/conftest.py
from PIL import Image

from clus_jax import cluster, embed, experts
from clus_jax.clustering import expert_subsets, outputs
from clus_jax.data import embedded as embedded_data
from clus_jax.data import side_fields
from clus_jax.data.side_fields import CENTERS_FILE, COARSE_CENTERS_FILE, FINE_TO_COARSE_FILE
from clus_jax.data.fields import FieldSpec
from clus_jax.objectives import registry
from clus_jax.train import loop

import train_helpers as helpers  # registered by tests/conftest.py

# The tests that read the module's tiny run and its embeddings (JAX start-up, compiles) are slow; the two-process
# clustering on synthetic points is the fast tier's multi-process path.

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The commands run on the eight fake devices of this process (tests/conftest.py): the same programs as the
# clusterings run here, so an interrupted command and an in-process resume give bit-equal centres.
ENV = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
DIM = 32
TOPK = 8
# Two vectors are "as near" when their squared distances (or similarities) differ by less than float32
# rounding of the [N, K] scores; the embeddings of so short a run lie close together. Unit embeddings, centres
# no longer than 1: a float32 squared distance is off by sq_distance_atol(DIM, 1, 1), twice that between the
# chosen centre and the nearest (1.6e-5); a cosine by gamma(D) + gamma(D + 3), 4 of those for two programs.
TIE = max(2 * tolerances.sq_distance_atol(DIM, 1.0, 1.0), 4 * (tolerances.gamma(DIM) + tolerances.gamma(DIM + 3)))


@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
    """(embedding directory, [N, D] image embeddings, class of each record): a 2-step CLIP on the embedded
    dataset (its default training data) and ``clus_jax.embed`` of that data."""
    run = str(tmp_path_factory.mktemp("run"))
    config = helpers.tiny_config("clip", total_steps=2, checkpoint_every=0)
    config.data.source = "embedded"
    loop.train_and_evaluate(config, run)
    out = str(tmp_path_factory.mktemp("emb"))
    args, overrides = embed.parse_args(["--workdir", run, "--out", out, "--modality", "image", "--batch-size", "512",
                                        "--shard-size", "2048"])
    assert embed.run(args, overrides)["complete"]
    x = side_fields.SideFieldReader(out, "image_emb").array()
    records = embedded_data.read_split(embedded_data.dataset_dir(), "train")
    classes = np.asarray([100 + r["label"] if r["style"] == "easyvqa" else r["category"] for r in records])
    assert x.shape == (len(records), DIM) and len(np.unique(classes)) > 5
    labels = str(tmp_path_factory.mktemp("labels") / "classes.npy")
    np.save(labels, classes)
    return out, x.astype(np.float64), classes, labels


def _command(*args: str) -> subprocess.CompletedProcess:
    return host_limits.run([sys.executable, "-m", "clus_jax.cluster", *args], cwd=REPO, env=ENV, capture_output=True,
                           text=True, base_s=600)


def _in_process(capsys, *args: str) -> tuple[dict, str]:
    cluster.main(list(args))
    captured = capsys.readouterr()
    return json.loads(captured.out.strip().splitlines()[-1]), captured.err


def _sq_distances(x: np.ndarray, c: np.ndarray) -> np.ndarray:
    return ((x[:, None, :] - np.asarray(c, np.float64)[None]) ** 2).sum(-1)


def _check_nearest(d: np.ndarray, ids: np.ndarray) -> None:
    """``ids`` are nearest under distances ``d`` [N, K] (up to float32 ties), and mostly the exact argmin."""
    chosen = np.take_along_axis(d, ids[:, None].astype(np.int64), 1)[:, 0]
    assert np.all(chosen <= d.min(1) + TIE)
    assert np.mean(ids == d.argmin(1)) > 0.97


@pytest.mark.slow
def test_two_levels_through_the_command(embedded, tmp_path):
    features, x, classes, labels = embedded
    out = tmp_path / "two"
    proc = _command("--features", features, "--levels", "12,3", "--iters", "4", "--labels", labels, "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "cluster: iteration 4/4  pass 100%  inertia" in proc.stderr and "eta 0:00:" in proc.stderr
    assert json.loads((out / "summary.json").read_text()) == summary

    centers, coarse = np.load(out / "centers.npy"), np.load(out / "coarse_centers.npy")
    assignments, fine_to_coarse = np.load(out / "assignments.npy"), np.load(out / "fine_to_coarse.npy")
    assert centers.shape == (12, DIM) and coarse.shape == (3, DIM) and centers.dtype == np.float32
    assert assignments.shape == (len(x),) and assignments.dtype == np.int32
    _check_nearest(_sq_distances(x, centers), assignments)
    _check_nearest(_sq_distances(centers.astype(np.float64), coarse), fine_to_coarse)
    np.testing.assert_array_equal(np.load(out / "coarse_assignments.npy"), fine_to_coarse[assignments])
    sizes = np.bincount(assignments, minlength=12)
    np.testing.assert_array_equal(np.load(out / "sizes.npy"), sizes)

    assert summary["points"] == summary["records"] == len(x) and summary["k"] == 12
    assert summary["levels"]["fine"] == 12 and summary["levels"]["coarse"] == 3
    inertia = np.mean(np.sum((x - centers[assignments]) ** 2, axis=1))
    # float64 on both sides (the command's is quality.inertia shard by shard): rtol 1e-6 is ~1e10 float64 ulps.
    np.testing.assert_allclose(summary["inertia"], inertia, rtol=1e-6)
    # The figures below are float64 ratios of integer counts: one or two roundings.
    assert summary["sizes"]["max"] == sizes.max() and summary["sizes"]["min"] == sizes.min()
    np.testing.assert_allclose(summary["sizes"]["imbalance"], sizes.max() / sizes.mean())
    coarse_sizes = np.bincount(fine_to_coarse[assignments], minlength=3)
    np.testing.assert_allclose(summary["levels"]["coarse_sizes"]["imbalance"], coarse_sizes.max() / coarse_sizes.mean())
    majority = sum(np.bincount(np.unique(classes, return_inverse=True)[1][assignments == j]).max(initial=0)
                   for j in range(12))
    np.testing.assert_allclose(summary["labels"]["purity"], majority / len(x))
    assert 0 <= summary["labels"]["nmi"] <= 1 and -1 <= summary["labels"]["adjusted_rand_index"] <= 1

    described = json.loads((out / outputs.OUTPUTS_FILE).read_text())
    assert described["files"][CENTERS_FILE]["shape"] == [12, DIM]
    assert described["files"][FINE_TO_COARSE_FILE] == {"shape": [12], "dtype": "int32",
                                                       "what": "coarse centre of each fine centre"}
    assert not (out / side_fields.MANIFEST).exists()  # a manifest is a side file's, and OUT is none
    with Image.open(out / "cluster_sizes.png") as image:
        assert image.format == "PNG" and image.size[0] > 600 and image.size[1] > 200


@pytest.mark.slow
def test_a_finished_clustering_is_not_redone_and_other_arguments_are_refused(embedded, tmp_path, capsys):
    features = embedded[0]
    args = ["--features", features, "--k", "3", "--iters", "1", "--out", str(tmp_path / "c")]
    first, _ = _in_process(capsys, *args)
    again, err = _in_process(capsys, *args)
    assert again == first and "is complete, nothing to do" in err
    with pytest.raises(SystemExit) as exit_info:
        cluster.main([*args, "--iters", "2", "--metric", "cosine"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1
    assert "holds another clustering (different iters, metric in cluster.json); pass another --out" in err


class ClusterLabelsProbe(registry.Objective):
    """Declares ``cluster_labels`` [8] and ``image_emb`` [D] as batch fields (two side files) and reports
    whether each row's first label is the nearest centre of that row's embedding: the two files reach the
    step aligned with the example they belong to."""

    name = "test_cluster_labels"
    centers = None  # unit centres [K, D], set by the test

    def batch_fields(self, config):
        return {"cluster_labels": FieldSpec((TOPK,), "int32"), "image_emb": FieldSpec((DIM,), "float32")}

    def loss(self, ctx):
        labels, emb = ctx.batch["cluster_labels"], ctx.batch["image_emb"]
        sims = emb @ jnp.asarray(self.centers).T
        first = jnp.take_along_axis(sims, labels[:, :1], axis=1)[:, 0]
        return jnp.zeros([]), {"first_is_nearest": jnp.mean(first >= sims.max(1) - TIE),
                               "labels_in_range": jnp.mean((labels >= 0) & (labels < len(self.centers))),
                               "emb_norm": jnp.mean(jnp.linalg.norm(emb, axis=1)),
                               "distinct_first": jnp.mean(labels[:, 0] != labels[0, 0])}, ctx.state


@pytest.fixture
def probe():
    registry.register(ClusterLabelsProbe)
    yield ClusterLabelsProbe
    registry._REGISTRY.pop(ClusterLabelsProbe.name, None)


@pytest.mark.slow
def test_top8_labels_side_file_is_read_by_a_training_run(embedded, tmp_path, capsys, probe):
    features, x, _, _ = embedded
    out, side = tmp_path / "top", tmp_path / "labels"
    summary, err = _in_process(capsys, "--features", features, "--k", "20", "--metric", "cosine", "--iters", "3",
                               "--topk", str(TOPK), "--assign-to", str(side), "--out", str(out))
    assert summary["topk"] == {"l": TOPK, "side_file": str(side), "records": len(x), "labelled": len(x)}
    centers = np.load(out / "centers.npy").astype(np.float64)
    # spherical k-means: float32 m / |m| (tolerances.unit_norm_atol; the float64 norm here adds nothing)
    np.testing.assert_allclose(np.linalg.norm(centers, axis=1), 1.0, rtol=0, atol=tolerances.unit_norm_atol(DIM))

    reader = side_fields.open_side_field(side, "cluster_labels", len(x))  # keyed by record index
    assert reader.spec == FieldSpec((TOPK,), "int32")
    labels = np.concatenate(list(reader.chunks()))
    sims = np.concatenate(list(side_fields.SideFieldReader(side, field="cluster_sims").chunks()))
    truth = x @ centers.T  # float64 similarities [N, K]
    top = -np.sort(-truth, axis=1)[:, :TOPK]
    # float32 x.c with the centres made unit again in float32 (relative gamma(D + 3)), a D-term dot: of |x| |c|.
    atol = (tolerances.gamma(DIM) + tolerances.gamma(DIM + 3)) * np.linalg.norm(x, axis=1).max()
    np.testing.assert_allclose(sims, top, rtol=0, atol=atol)  # the 8 largest, in order
    np.testing.assert_allclose(np.take_along_axis(truth, labels.astype(np.int64), 1), sims, rtol=0, atol=atol)
    assert np.mean(labels == np.argsort(-truth, axis=1, kind="stable")[:, :TOPK]) > 0.97
    assert all(len(set(row)) == TOPK for row in labels[:50])
    assignments = np.load(out / "assignments.npy")  # k-means's own last pass: the same nearest centres up to ties
    _check_nearest(-truth, assignments)
    assert np.mean(labels[:, 0] == assignments) > 0.99

    probe.centers = centers.astype(np.float32)
    config = helpers.tiny_config("clip", total_steps=2, log_every=1, checkpoint_every=0)
    config.data.source = "embedded"
    config.objectives = {"clip": 1.0, probe.name: 1.0}
    config.data.side_fields = {"cluster_labels": str(side), "image_emb": features}
    workdir = tmp_path / "train"
    loop.train_and_evaluate(config, str(workdir))
    logged = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in logged if f"train/{probe.name}/first_is_nearest" in m]
    assert len(steps) == 2
    for m in steps:
        assert m[f"train/{probe.name}/first_is_nearest"] == 1.0 and m[f"train/{probe.name}/labels_in_range"] == 1.0
        assert abs(m[f"train/{probe.name}/emb_norm"] - 1.0) < 1e-3  # real embeddings, not the zero dummy batch
        assert m[f"train/{probe.name}/distinct_first"] > 0  # and more than one cluster


@pytest.mark.slow
def test_an_interrupted_clustering_resumes_to_the_same_centres(embedded, tmp_path, capsys):
    features = embedded[0]
    args = ["--features", features, "--k", "10", "--iters", "5", "--chunk-rows", "2048", "--checkpoint-every", "0",
            "--seed", "3"]
    killed = host_limits.run([sys.executable, "-m", "clus_jax.cluster", *args, "--out", str(tmp_path / "a")],
                             cwd=REPO, env={**ENV, "CLUS_JAX_FAULT": "after_iteration:3"}, capture_output=True,
                             text=True, base_s=600)
    assert killed.returncode == -9, killed.stderr[-2000:]  # SIGKILL as pass 4 began
    assert "iteration 3/5  pass 100%" in killed.stderr and not (tmp_path / "a" / "summary.json").exists()
    resumed, err = _in_process(capsys, *args, "--out", str(tmp_path / "a"))
    assert "cluster: resumed at iteration 4/5" in err and "iteration 1/5" not in err
    whole, err = _in_process(capsys, *args, "--out", str(tmp_path / "b"))
    assert "resumed" not in err
    for name in ("centers.npy", "assignments.npy", "sizes.npy"):
        np.testing.assert_array_equal(np.load(tmp_path / "a" / name), np.load(tmp_path / "b" / name))
    assert resumed["inertia"] == whole["inertia"] and resumed["iterations"] == whole["iterations"] == 5


@pytest.mark.slow
@pytest.mark.parametrize("args, code, named", [
    (["--k", "4", "--topk", "2"], 2, "--topk L and --assign-to DIR go together"),
    (["--k", "4", "--topk", "9", "--assign-to", "x"], 2, "--topk=9 must be in [1, --k=4]"),
    (["--levels", "4"], 2, "--levels expects M,N"),
    (["--levels", "4,8"], 2, "the coarse count must not exceed the fine count"),
    (["--k", "5", "--levels", "4,2"], 2, "--k=5 and --levels=4,2 disagree"),
    (["--levels", "4,2", "--tol", "0.1"], 2, "--tol apply to single-level clustering"),
    (["--k", "4", "--metric", "manhattan"], 2, "--metric: invalid choice: 'manhattan'"),
    (["--k", "4", "--mesh", "data=3"], 2, "--mesh: config.mesh {'data': 3"),
    (["--k", "100000"], 2, "--k=100000 exceeds the 7370 embedded points"),
    (["--k", "4", "--field", "text_emb"], 1, "has no field 'text_emb'"),
    (["--k", "4", "--features", "/nonexistent/emb"], 1, "has no manifest.json"),
    (["--k", "4", "--bogus"], 2, "unrecognized arguments: --bogus"),
    (["--k", "4", "--balanced-coarse"], 2, "--balanced-coarse goes with --levels M,N"),
    (["--levels", "6,4", "--balanced-coarse"], 2, "--balanced-coarse needs the 6 fine centres of --levels to divide"),
], ids=["topk-alone", "topk-range", "levels-form", "levels-order", "k-levels", "levels-tol", "metric", "mesh",
        "k-too-large", "field", "features", "unknown-flag", "coarse-alone", "coarse-divides"])
def test_bad_arguments_print_one_line(embedded, tmp_path, capsys, args, code, named):
    argv = ["--features", embedded[0], "--out", str(tmp_path / "o"), *args]
    with pytest.raises(SystemExit) as exit_info:
        cluster.main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == code and err.count("\n") == 1 and err.startswith("error: "), err
    assert named in err
    assert not (tmp_path / "o" / "summary.json").exists()


def test_embed_cluster_and_experts_write_one_side_file_format_and_the_agreed_file_names(tmp_path, capsys):
    """MiniLM captions of 20 synthetic records (clus_jax.embed, shards of 9), clustered in two levels with top-2
    labels (clus_jax.cluster), then MoDE's expert subsets (clus_jax.experts): both side files carry the manifest
    that side_fields writes and read back through its reader, and every file a later stage opens by name
    (the centres, the hierarchy, the subsets) is where those names say."""
    emb = tmp_path / "emb"
    args, overrides = embed.parse_args(["--encoder", "minilm", "--out", str(emb), "--shard-size", "9",
                                        "--data.source=synthetic", "--data.synthetic_size=20"])
    assert embed.run(args, overrides)["complete"]
    out, labels = tmp_path / "clusters", tmp_path / "labels"
    summary, _ = _in_process(capsys, "--features", str(emb), "--field", "text_emb", "--levels", "4,2", "--iters", "2",
                             "--topk", "2", "--assign-to", str(labels), "--out", str(out))
    assert summary["records"] == 20 and summary["topk"]["labelled"] == summary["points"]
    for path, shard_size in ((emb, 9), (labels, side_fields.DEFAULT_SHARD_SIZE)):
        written = json.loads((path / side_fields.MANIFEST).read_text())
        ranges = side_fields.shard_ranges(20, shard_size)
        assert written == side_fields.manifest(side_fields.field_specs(path), ranges), path
    rows = side_fields.open_side_field(emb, "text_emb", 20).array()
    ids = side_fields.open_side_field(labels, "cluster_labels", 20).array()
    assert rows.shape == (20, 384) and ids.shape == (20, 2)

    centers = np.load(out / CENTERS_FILE)
    assert centers.shape == (4, 384) and np.load(out / FINE_TO_COARSE_FILE).shape == (4,)
    assert np.load(out / COARSE_CENTERS_FILE).shape == (2, 384)
    assert np.load(out / outputs.ASSIGNMENTS_FILE).shape == (20,)
    assert outputs.read_summary(out) == summary

    subsets = tmp_path / "subsets"
    experts.run(experts.parse_args(["--features", str(emb), "--clusters", str(out), "--out", str(subsets),
                                    "--ooc-ratio", "0"]))
    members = np.concatenate([np.load(subsets / expert_subsets.subset_file(c)) for c in range(2)])
    assert sorted(members.tolist()) == np.flatnonzero(side_fields.SideFieldReader(emb, "valid").array()).tolist()


def test_records_without_an_embedding_get_no_cluster(tmp_path, capsys):
    """A hand-made embedding directory (the clus_jax.embed format) of 11 records in shards of 4, records 2, 4,
    5 and 10 invalid: those get assignment -1 and labels -1, and every other record its own nearest centres."""
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(11, 3)).astype(np.float32)
    valid = np.ones(11, bool)
    valid[[2, 4, 5, 10]] = False
    emb[~valid] = 0.0
    features = side_fields.write_side_file(tmp_path / "emb", {"image_emb": emb, "index": np.arange(11, dtype=np.int64),
                                                              "valid": valid}, shard_size=4)
    out, side = tmp_path / "c", tmp_path / "labels"
    summary, _ = _in_process(capsys, "--features", features, "--k", "3", "--iters", "2", "--topk", "2",
                             "--assign-to", str(side), "--out", str(out))
    assert summary["points"] == 7 and summary["records"] == 11 and summary["topk"]["labelled"] == 7
    centers, assignments = np.load(out / "centers.npy"), np.load(out / "assignments.npy")
    d = _sq_distances(emb[valid].astype(np.float64), centers)
    np.testing.assert_array_equal(assignments[~valid], -1)
    np.testing.assert_array_equal(assignments[valid], d.argmin(1))
    labels = np.concatenate(list(side_fields.open_side_field(side, "cluster_labels", 11).chunks()))
    sims = np.concatenate(list(side_fields.SideFieldReader(side, field="cluster_sims").chunks()))
    np.testing.assert_array_equal(labels[~valid], -1)
    np.testing.assert_array_equal(sims[~valid], 0.0)
    np.testing.assert_array_equal(labels[valid], np.argsort(d, axis=1)[:, :2])
    # minus the float32 squared distance (2 x.c - |c|^2 - |x|^2): tolerances.sq_distance_atol
    atol = tolerances.sq_distance_atol(3, np.linalg.norm(emb, axis=1).max(), np.linalg.norm(centers, axis=1).max())
    np.testing.assert_allclose(sims[valid], -np.sort(d, axis=1)[:, :2], rtol=0, atol=atol)


def test_balanced_clusters_of_skewed_points_are_equal(tmp_path, capsys):
    """Ten points around one place and two around another, --balanced --k 3: three clusters of four."""
    rng = np.random.default_rng(1)
    emb = np.concatenate([rng.normal(0.0, 0.1, (10, 2)), rng.normal(5.0, 0.1, (2, 2))]).astype(np.float32)
    features = side_fields.write_side_file(tmp_path / "emb", {"image_emb": emb, "index": np.arange(12, dtype=np.int64)})
    summary, _ = _in_process(capsys, "--features", features, "--k", "3", "--iters", "5", "--balanced",
                             "--out", str(tmp_path / "c"))
    np.testing.assert_array_equal(np.bincount(np.load(tmp_path / "c" / "assignments.npy"), minlength=3), [4, 4, 4])
    assert summary["balanced"] and summary["sizes"]["imbalance"] == 1.0
    with pytest.raises(SystemExit):  # 12 points do not split into 5 equal clusters
        cluster.main(["--features", features, "--k", "5", "--balanced", "--out", str(tmp_path / "d")])
    assert "--balanced needs the 12 points to divide into --k=5 equal clusters" in capsys.readouterr().err


@pytest.mark.multiprocess
def test_two_processes_cluster_like_one(tmp_path, capsys):
    """launch/local.sh with MODULE=clus_jax.cluster: 2 processes x 4 devices, centres split over tensor=2,
    reach the centres of one process on 8 devices (up to the order of the float32 sums) and write once.

    The points are 8 tight blobs, one k-means++ centre each: every point's nearest centre is clear in every
    pass, so both runs make the same assignments and differ only in how they sum. (The tiny run's embeddings
    lie so close together that float32 rounding decides many of their assignments.)"""
    rng = np.random.default_rng(2)
    means = np.eye(DIM)[:8]  # sqrt(2) apart; the blobs' radius is about 0.02 sqrt(DIM) = 0.11
    emb = (means[rng.integers(0, 8, 4096)] + 0.02 * rng.normal(size=(4096, DIM))).astype(np.float32)
    features = side_fields.write_side_file(
        tmp_path / "emb", {"image_emb": emb, "index": np.arange(4096, dtype=np.int64)}, shard_size=1000)
    x = emb.astype(np.float64)
    args = ["--features", features, "--k", "8", "--iters", "2", "--init", "kmeans++", "--mesh", "data=4,tensor=2",
            "--topk", "3"]
    out = tmp_path / "two"
    env = {k: v for k, v in ENV.items() if not k.startswith(("CLUS_JAX_", "LOCAL_"))}
    env.update(MODULE="clus_jax.cluster", PYTHON=sys.executable, TIMEOUT=str(int(host_limits.limit(300))))
    proc = host_limits.run(["bash", "launch/local.sh", "2", *args, "--assign-to", str(out / "labels"), "--out", str(out)],
                           cwd=REPO, env=env, base_s=360)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-2000:])
    for i in (0, 1):
        assert "cluster: iteration 2/2  pass 100%" in (out / "logs" / f"process_{i}.log").read_text()
    one, _ = _in_process(capsys, *args, "--assign-to", str(tmp_path / "one_labels"), "--out", str(tmp_path / "one"))
    centers, assignments = np.load(out / "centers.npy"), np.load(out / "assignments.npy")
    d = _sq_distances(x, centers)
    assert sorted(((centers[:, None, :] - means[None]) ** 2).sum(-1).argmin(1).tolist()) == list(range(8))
    gaps = np.diff(np.sort(d, axis=1)[:, :2], axis=1)[:, 0]  # next nearest minus nearest; |x|, |c| < 1.5
    assert gaps.min() > 1e3 * tolerances.sq_distance_atol(DIM, 1.5, 1.5)  # far beyond float32 rounding
    np.testing.assert_array_equal(assignments, d.argmin(1))
    np.testing.assert_array_equal(assignments, np.load(tmp_path / "one" / "assignments.npy"))
    # The same clusters summed in other orders (per-process partial sums, a cross-process all-reduce): a centre
    # moves by at most twice tolerances.mean_atol(n_j, mean |x|) per coordinate.
    atol = np.stack([2 * tolerances.mean_atol(int(np.sum(assignments == j)), np.abs(x[assignments == j]).mean(0))
                     for j in range(8)])
    one_centers = np.load(tmp_path / "one" / "centers.npy")
    np.testing.assert_allclose((centers - one_centers) / atol, 0, rtol=0, atol=1)  # in units of the bound
    assert np.linalg.norm(atol, axis=1).max() < 1e-4  # a point lost or counted twice moves one by 0.11 / 512
    labels = np.concatenate(list(side_fields.open_side_field(out / "labels", "cluster_labels", len(x)).chunks()))
    assert labels.shape == (len(x), 3)
    np.testing.assert_array_equal(labels[:, 0], assignments)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["points"] == one["points"] == len(x)
    assert summary["processes"] == 2 and one["processes"] == 1
    assert summary["mesh"] == one["mesh"] == {"data": 4, "fsdp": 1, "tensor": 2}
    # float64 inertias of the same assignments: |d|x - c|^2| <= 2 |x - c| |dc| + |dc|^2 with |dc| from atol.
    dc = np.linalg.norm(atol, axis=1)[assignments]
    bound = np.mean(2 * np.sqrt(d[np.arange(len(x)), assignments]) * dc + dc ** 2)
    np.testing.assert_allclose(summary["inertia"], one["inertia"], rtol=0, atol=bound)
