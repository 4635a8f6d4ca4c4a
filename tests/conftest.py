"""Test-wide setup: eight fake CPU devices so every sharded path runs on a laptop or CI, and the shared
training helpers (``tests/train/helpers.py``) importable as ``train_helpers`` and the NumPy reference losses
(``tests/objectives/{open_clip,swav}_reference.py``) under their file names, from any test module."""
import importlib.util
import os
import sys

os.environ.setdefault("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")


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
