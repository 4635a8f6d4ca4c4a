"""The float64 NumPy Lloyd's algorithm (``kmeans_reference.py``) importable under its file name from the
clustering tests (the suite imports test modules with ``--import-mode=importlib``)."""
import importlib.util
import os
import sys

_path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "kmeans_reference.py")
_spec = importlib.util.spec_from_file_location("kmeans_reference", _path)
_module = importlib.util.module_from_spec(_spec)
sys.modules["kmeans_reference"] = _module
_spec.loader.exec_module(_module)
