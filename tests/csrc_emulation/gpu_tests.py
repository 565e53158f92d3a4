"""The GPU tests' helpers and shapes (tests/ops/test_<op>.py), shared so the emulated tests cannot drift."""
import importlib.util
import os

OPS_TESTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "ops")


def load(op):
    """tests/ops/test_<op>.py as a module under another name (pytest does not collect it twice)."""
    path = os.path.join(OPS_TESTS, f"test_{op}.py")
    spec = importlib.util.spec_from_file_location(f"gpu_tests_{op}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
