"""Every benchmark script runs end to end with --quick and prints its JSON records (no timings checked).

The scripts run in the background as the module starts, as many at a time as the run has cores, in the order
the tests ask for them. Each has its own time limit from its own start: ``BASE_S`` on the reference host, scaled by the host
factor (``tests/host_limits.py``), so a slow host is given the time it needs and a hang still fails with the
script's own output.
"""
import concurrent.futures
import json
import os
import re
import sys

import host_limits  # registered by tests/conftest.py
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OPEN_CLIP_PYTHON = os.environ.get("OPEN_CLIP_PYTHON", "/tmp/ocbench/bin/python")
HAVE_OPEN_CLIP = os.path.exists(OPEN_CLIP_PYTHON)
SCRIPTS = ["host.py", "step.py", "memory.py", "input.py", "sinkhorn.py", "profile_step.py", "kmeans.py", "gpu.sh",
           "microbatch_memory.py", "supervised_ceiling.py", "eval_stream.py", "mlcd_ablation.py", "balanced_kmeans.py"] + (["vs_open_clip.py"] if HAVE_OPEN_CLIP else [])
# Seconds one script may take on the reference host, run alone beside one other test worker.
BASE_S = 300


def _run_one(script: str, env: dict):
    runner = [sys.executable] if script.endswith(".py") else ["bash"]
    return host_limits.run([*runner, os.path.join("bench", script), "--quick"], BASE_S, cwd=REPO, env=env)


@pytest.fixture(scope="module")
def quick_runs():
    env = dict(os.environ)
    env["XLA_FLAGS"] = re.sub(r"--xla_force_host_platform_device_count=\S+", "", env.get("XLA_FLAGS", "")).strip()
    env["PYTHON"] = sys.executable  # what bench/gpu.sh runs gpu.py with
    at_once = max(1, len(os.sched_getaffinity(0)))
    with concurrent.futures.ThreadPoolExecutor(at_once) as pool:
        futures = {s: pool.submit(_run_one, s, env) for s in SCRIPTS}
        yield futures
        for f in futures.values():
            f.cancel()


def records(quick_runs, script: str) -> list[dict]:
    proc = quick_runs[script].result()
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


@pytest.mark.slow
def test_host(quick_runs):
    (row,) = records(quick_runs, "host.py")
    assert row["xla_matmul_gflops"] > 0 and row["host_factor"] >= 1.0 and row["cores"] >= 1
    assert {"model", "ids", "avx2", "avx512", "amx"} <= set(row)


@pytest.mark.slow
def test_step_quick(quick_runs):
    rows = records(quick_runs, "step.py")
    by_objective = {r["objective"]: r for r in rows}
    assert "clip" in by_objective and len(by_objective) >= 2
    assert by_objective["clip"]["vs_clip"] == 1.0
    assert all(r["gflops_per_step"] > 0 and r["step_s"] > 0 and 0 < r["mfu"] for r in rows)


@pytest.mark.slow
def test_memory_quick(quick_runs):
    rows = records(quick_runs, "memory.py")
    loss = [r for r in rows if r["bench"] == "memory/loss"]
    scale = [r for r in rows if r["bench"] == "memory/scale"]
    assert len(loss) == 2 and len(scale) == 1
    assert scale[0]["param_bytes"] > 0 and scale[0]["collectives"]["all-gather"]["count"] > 0


@pytest.mark.slow
def test_input_quick(quick_runs):
    rows = records(quick_runs, "input.py")
    assert {r["bench"] for r in rows} == {"input/pipeline", "input/train_run"}
    assert all(0 <= r["data_wait_fraction"] <= 1 for r in rows if r["bench"] == "input/train_run")


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_OPEN_CLIP, reason="no PyTorch + open_clip environment (see bench/vs_open_clip.py)")
def test_vs_open_clip_quick(quick_runs):
    rows = records(quick_runs, "vs_open_clip.py")
    assert len(rows) == 1 and rows[0]["ratio"] > 0
    # A ratio is only meaningful next to the processor family and its matmul rate.
    assert rows[0]["xla_matmul_gflops"] > 0 and {"host", "ids", "avx512", "amx"} <= set(rows[0])


@pytest.mark.slow
def test_sinkhorn_quick(quick_runs):
    rows = records(quick_runs, "sinkhorn.py")
    impls = {r["impl"] for r in rows}
    assert {"numpy (SwAV)", "jax scaling", "jax log-domain"} <= impls
    assert all(r["max_abs_diff_vs_numpy"] < 1e-5 and r["vs_numpy"] > 0 for r in rows)


@pytest.mark.slow
def test_profile_step_quick(quick_runs):
    (row,) = records(quick_runs, "profile_step.py")
    parts = row["several_ms"] + row["one_thread_ms"] + row["idle_ms"]
    assert row["thread_ms"] > 0 and abs(parts - row["span_ms"]) <= 1e-6 * row["span_ms"] + 1e-3


@pytest.mark.slow
def test_kmeans_quick(quick_runs):
    rows = records(quick_runs, "kmeans.py")
    speed = [r for r in rows if r["part"] in ("speed", "sharded")]
    assert {"faiss", "clus_jax", "clus_jax tensor=8"} <= {r["impl"] for r in speed}
    assert all(r["s_per_iter"] > 0 and abs(r["inertia_vs_faiss"]) < 0.01 for r in speed)
    (memory,) = [r for r in rows if r["part"] == "memory"]
    assert memory["devices"] == 8 and memory["peak_gb"] > 0


@pytest.mark.slow
def test_gpu_quick(quick_runs):
    """bench/gpu.sh --quick: every figure of the GPU measurement at tiny sizes (CPU: no MFU, no datasheet peak)."""
    rows = records(quick_runs, "gpu.sh")
    by_bench = {}
    for r in rows:
        by_bench.setdefault(r["bench"], []).append(r)
    errors = [r["error"] for r in rows if "error" in r]
    assert not errors, errors
    clip = by_bench["gpu/clip"]
    assert [r["remat"] for r in clip] == [False, True]
    assert clip[0]["batch"] > 8 and all(r["images_per_s"] > 0 and r["predicted_device_gib"] > 0 for r in clip)
    assert sorted(r["num_prototypes"] for r in by_bench["gpu/swap"]) == [30, 100]
    assert all(r["images_per_s"] > 0 for r in by_bench["gpu/swap"])
    assert len(by_bench["gpu/mlcd"]) == 1 and len(by_bench["gpu/kmeans"]) == 1
    assert "gpu/done" in by_bench and all("xla_flags" in r and "device_kind" in r for r in rows)


@pytest.mark.slow
def test_microbatch_memory_quick(quick_runs):
    rows = records(quick_runs, "microbatch_memory.py")
    assert [(r["global_batch"], r["microbatches"]) for r in rows] == [(8, 1), (64, 8), (64, 1)]
    assert rows[1]["temp_vs_small"] < rows[2]["temp_vs_small"]


@pytest.mark.slow
def test_supervised_ceiling_quick(quick_runs):
    rows = records(quick_runs, "supervised_ceiling.py")
    assert [r["variant"] for r in rows] == ["patch8", "default"]
    assert all(0.0 <= r["top1"] <= r["shape_top1"] <= 1.0 for r in rows)
    assert rows[1]["image_gflops"] > rows[0]["image_gflops"]  # the default's stem and 64 tokens against 16


@pytest.mark.slow
def test_eval_stream_quick(quick_runs):
    rows = records(quick_runs, "eval_stream.py")
    sizes = [r for r in rows if "size" in r]
    assert [r["size"] for r in sizes] == [500, 5000]
    assert all(r["decode_errors"] == 0 and r["images_per_second"] > 0 and r["peak_rss_mib"] > 0 for r in sizes)
    (summary,) = [r for r in rows if "peak_rss_ratio" in r]
    assert summary["peak_rss_ratio"] > 0 and summary["matmul_gflops"] > 0


@pytest.mark.slow
def test_mlcd_ablation_quick(quick_runs):
    """bench/mlcd_ablation.py --quick: a tiny teacher trained, embedded and clustered at two Ks, three MLCD rows
    at one student budget with their probe, k-NN and what Partial-FC sampling kept, next to the host."""
    rows = records(quick_runs, "mlcd_ablation.py")
    (teacher,) = [r for r in rows if r["bench"] == "mlcd_ablation/teacher"]
    assert teacher["seconds"] > 0 and teacher["xla_matmul_gflops"] > 0 and {"host", "ids", "cores"} <= set(teacher)
    ablation = [r for r in rows if r["bench"] == "mlcd_ablation"]
    assert [(r["row"], r["k"], r["labels"], r["rate"]) for r in ablation] == [
        ("base", 16, 4, 1.0), ("l1", 16, 1, 1.0), ("k256_r01", 256, 1, 0.1)]
    for r in ablation:
        assert r["seeds"] == [0] and (r["steps"], r["batch"]) == (2, 16) and r["teacher"] == teacher["teacher"]
        assert 0.0 <= r["linear"] <= 1.0 and 0.0 <= r["knn"] <= 1.0 and r["xla_matmul_gflops"] > 0
        assert 0 < r["distinct_positives"] <= 16 * r["labels"]
    base, l1, sampled = ablation
    assert l1["distinct_positives"] < base["distinct_positives"]  # the nearest of the same clustering's 4 labels
    assert base["centres_scored"] == l1["centres_scored"] == 16  # r = 1.0: every centre
    assert sampled["centres_scored"] == 25 and 0 < sampled["negatives_kept"] < sampled["negatives_all"]


@pytest.mark.slow
def test_balanced_kmeans_quick(quick_runs):
    """bench/balanced_kmeans.py --quick: two iterations with their seconds and the auction's searches, and a summary
    with equal clusters, the peak RSS and the host."""
    rows = records(quick_runs, "balanced_kmeans.py")
    iterations = [r for r in rows if r["bench"] == "balanced_kmeans/iteration"]
    assert [r["iteration"] for r in iterations] == [0, 1]
    assert all(r["seconds"] > 0 and r["mesh_searches"] >= 1 for r in iterations)
    (summary,) = [r for r in rows if r["bench"] == "balanced_kmeans"]
    assert summary["cluster_size"] == 16384 // 64 and summary["peak_rss_mib"] > 0 and summary["xla_matmul_gflops"] > 0
