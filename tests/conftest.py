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
# Float64 NumPy transcriptions of the reference losses, the oracles of tests/objectives.
_register("open_clip_reference", "objectives", "open_clip_reference.py")
_register("swav_reference", "objectives", "swav_reference.py")
_register("moco_reference", "objectives", "moco_reference.py")
_register("unicom_reference", "objectives", "unicom_reference.py")
