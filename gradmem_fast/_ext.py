"""Lazy loader for the compiled CUDA extension `gradmem_fast._C` (csrc/).

The extension registers its kernels as torch custom ops in the `gradmem_fast` namespace
(`torch.ops.gradmem_fast.*`). Nothing is loaded or compiled at import time. `load()` returns the
op namespace or None, and `reason()` says why it is unavailable. `GRADMEM_FAST_JIT=1` compiles
csrc/ on first use from a source checkout (torch.utils.cpp_extension.load with ninja) when no
built module is installed.
"""
import functools
import glob
import importlib
import os

_CSRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc")
KERNEL_DTYPES = ("float32", "float16", "bfloat16")


@functools.lru_cache(maxsize=None)
def _load():
    import torch

    try:
        importlib.import_module("gradmem_fast._C")
        return torch.ops.gradmem_fast, None
    except ImportError as exc:
        built_error = f"gradmem_fast._C is not built ({exc})"
    if os.environ.get("GRADMEM_FAST_JIT", "0") != "1":
        return None, built_error + "; set GRADMEM_FAST_JIT=1 to compile csrc/ on first use"
    sources = sorted(glob.glob(os.path.join(_CSRC, "*.cpp")) + glob.glob(os.path.join(_CSRC, "*.cu")))
    if not sources:
        return None, f"no csrc sources found under {_CSRC}"
    try:
        from torch.utils.cpp_extension import load

        load(
            name="gradmem_fast_C",
            sources=sources,
            extra_cflags=["-O3"],
            extra_cuda_cflags=["-O3"],
            is_python_module=False,
            verbose=False,
        )
    except Exception as exc:
        return None, f"JIT build of csrc/ failed ({exc})"
    return torch.ops.gradmem_fast, None


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


def use_kernel(backend, op, *tensors, why=None):
    """Whether `op` runs its csrc kernel on these tensors under `backend` (the policy of gradmem_fast.backends);
    `why` is an op-specific reason (dtype mix, shape) the kernel cannot take the call, or None.

    "auto" takes the kernel when it can run (CUDA tensors, extension built, fp32/fp16/bf16), else the
    pure-PyTorch twin, warning once unless the tensors are on the CPU (the twin by design); "kernel" raises
    RuntimeError with the reason when it cannot run; "reference" always takes the twin.
    """
    from .backends import check_op_backend, on_host, use_kernel as choose

    if check_op_backend(backend) == "reference":
        return False
    reason = why or cuda_op_reason(*tensors)
    if reason is None:
        for t in tensors:
            if t is not None and t.is_floating_point() and str(t.dtype).replace("torch.", "") not in KERNEL_DTYPES:
                reason = f"dtype {t.dtype} (csrc kernels take float32, float16, bfloat16)"
                break
    if reason is not None and not any(t is not None and t.device.type == "cuda" for t in tensors):
        reason = on_host(reason)  # CPU tensors take the twins by design: no warning
    return choose(backend, op, reason, "csrc kernel")
