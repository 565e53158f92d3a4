"""Lazy loader for the compiled CUDA extension `gradmem_fast._C` (csrc/).

Nothing is loaded or compiled at import time. `load()` returns the module or None, and
`reason()` says why it is unavailable. `GRADMEM_FAST_JIT=1` compiles csrc/ on first use from a
source checkout (torch.utils.cpp_extension.load with ninja) when no built module is installed.
"""
import functools
import glob
import importlib
import os

_CSRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc")


@functools.lru_cache(maxsize=None)
def _load():
    try:
        return importlib.import_module("gradmem_fast._C"), None
    except ImportError as exc:
        built_error = f"gradmem_fast._C is not built ({exc})"
    if os.environ.get("GRADMEM_FAST_JIT", "0") != "1":
        return None, built_error + "; set GRADMEM_FAST_JIT=1 to compile csrc/ on first use"
    sources = sorted(glob.glob(os.path.join(_CSRC, "*.cpp")) + glob.glob(os.path.join(_CSRC, "*.cu")))
    if not sources:
        return None, f"no csrc sources found under {_CSRC}"
    try:
        from torch.utils.cpp_extension import load

        module = load(
            name="gradmem_fast_C",
            sources=sources,
            extra_cflags=["-O3", "-std=c++17"],
            extra_cuda_cflags=["-O3", "--use_fast_math", "-std=c++17"],
            verbose=False,
        )
    except Exception as exc:
        return None, f"JIT build of csrc/ failed ({exc})"
    return module, None


def load():
    return _load()[0]


def reason():
    """None when the extension is usable, else why not."""
    return _load()[1]


def cuda_op_reason(*tensors):
    """None when a csrc op can take these tensors, else why not."""
    for t in tensors:
        if t is not None and t.device.type != "cuda":
            return f"tensor on {t.device} (csrc ops need CUDA)"
    return reason()
