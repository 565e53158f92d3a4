"""Test setup. The Triton interpreter is switched on here, before any kernel module is imported,
when no GPU is present, so CPU CI runs the Triton kernels at tiny shapes."""
import importlib.util
import os
import sys

if os.environ.get("TRITON_INTERPRET") is None:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import pytest  # noqa: E402
import torch  # noqa: E402

# The tests run tiny shapes, where torch's intra-op threads cost more than they save (and on a
# loaded two-core machine far more: a small float64 linear took 40 ms with two threads, 0.01 ms with one).
torch.set_num_threads(1)


def _missing():
    """{marker: skip reason} for what this machine lacks."""
    missing = {}
    if importlib.util.find_spec("triton") is None:
        missing["needs_triton"] = f"needs the triton package, which is not installed (torch {torch.__version__})"
    if not torch.backends.cuda.is_built():
        missing["needs_cuda_build"] = f"needs a CUDA build of torch; torch {torch.__version__} is a CPU-only build"
    if not torch.cuda.is_available():
        missing["gpu"] = "needs a CUDA device"
    return missing


def pytest_collection_modifyitems(config, items):
    missing = _missing()
    for item in items:
        for marker, reason in missing.items():
            if marker in item.keywords:
                item.add_marker(pytest.mark.skip(reason=reason))
                break


@pytest.fixture(autouse=True)
def _fresh_warn_once(monkeypatch):
    """Each test sees the backends' warn-once warnings afresh, whatever ran before it in this process."""
    from gradmem_fast import backends

    monkeypatch.setattr(backends, "_warned", set())
