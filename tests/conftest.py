"""Test-wide setup: eight fake CPU devices so every sharded path runs on a laptop or CI, and the shared
training helpers (``tests/train/helpers.py``) importable as ``train_helpers`` and the NumPy reference losses
(``tests/objectives/{open_clip,swav}_reference.py``) under their file names, from any test module."""
import importlib.util
import os
import shutil
import sys
import tempfile

os.environ.setdefault("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent compilation cache per test run, shared by both xdist workers (they inherit this process's
# environment) and every process a test starts: a restarted run compiles what the first one did, and
# several tests build the same tiny train step. CLUS_JAX_TEST_COMPILE_CACHE=0 compiles everything afresh.
_OWN_CACHE = None
if os.environ.get("CLUS_JAX_TEST_COMPILE_CACHE", "1") != "0" and "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _OWN_CACHE = tempfile.mkdtemp(prefix="clus_jax-test-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _OWN_CACHE
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")


def _host_record() -> dict:
    """The processor family and XLA matmul rate (``bench/host.py``), measured once per run before the xdist
    workers start; they and every process a test starts inherit the factor through the environment."""
    spec = importlib.util.spec_from_file_location(
        "bench_host", os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "host.py"))
    host = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(host)
    if "CLUS_JAX_TEST_HOST_FACTOR" in os.environ:  # an xdist worker, or a factor the caller fixed
        gflops = host.REFERENCE_GFLOPS / float(os.environ["CLUS_JAX_TEST_HOST_FACTOR"])
        return dict(host.describe(gflops), host_factor=float(os.environ["CLUS_JAX_TEST_HOST_FACTOR"]))
    record = host.describe()
    os.environ["CLUS_JAX_TEST_HOST_FACTOR"] = str(record["host_factor"])
    return record


_HOST = None


def pytest_configure(config):
    global _HOST
    _HOST = _host_record()


def pytest_report_header(config):
    line = ", ".join(f"{k}={v}" for k, v in _HOST.items())
    return [f"host: {line} (subprocess time limits are scaled by host_factor: tests/host_limits.py)"]


def pytest_sessionfinish(session, exitstatus):
    if _OWN_CACHE:
        shutil.rmtree(_OWN_CACHE, ignore_errors=True)


def _register(module_name: str, *path_in_tests: str) -> None:
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), *path_in_tests)
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)


_register("train_helpers", "train", "helpers.py")
_register("host_limits", "host_limits.py")
_register("tolerances", "tolerances.py")
_register("snapshots", "snapshots.py")
_register("local_processes", "local_processes.py")
# Float64 NumPy transcriptions of the reference losses, the oracles of tests/objectives.
_register("open_clip_reference", "objectives", "open_clip_reference.py")
_register("swav_reference", "objectives", "swav_reference.py")
_register("moco_reference", "objectives", "moco_reference.py")
_register("unicom_reference", "objectives", "unicom_reference.py")
