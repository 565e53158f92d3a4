"""Whether a Triton kernel can run on given tensors, with the reason when it cannot."""
import functools
import os

import torch

# the dtypes the Triton kernels compute in
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def _import_reason():
    try:
        import triton  # noqa: F401
    except Exception as exc:  # pragma: no cover - depends on the install
        return f"triton is not importable ({exc})"
    return None


def triton_reason(*tensors):
    """None when the Triton kernels can take these tensors, else why not."""
    reason = _import_reason()
    if reason is not None:
        return reason
    for t in tensors:
        if t is None:
            continue
        if t.device.type == "cuda":
            continue
        if t.device.type == "cpu" and interpreter_on():
            continue
        return f"tensor on {t.device} (Triton needs CUDA, or TRITON_INTERPRET=1 on CPU)"
    return None


def elementwise_reason(*tensors):
    """triton_reason, then the dtype limits every Triton kernel shares, as a backends.Reason (None: the kernel
    can run). Where Triton does not run on these tensors, or bfloat16 meets the interpreter (whose bfloat16
    arithmetic is wrong), the twin is the intended path (on_host)."""
    from .backends import on_host

    why = triton_reason(*tensors)
    if why is not None:
        return on_host(why)
    x = tensors[0]
    if x.dtype not in KERNEL_DTYPES:
        return f"dtype {x.dtype} (the kernels take float32, float16, bfloat16)"
    if x.dtype == torch.bfloat16 and x.device.type == "cpu" and interpreter_on():
        return on_host("bfloat16 under the Triton interpreter (its bfloat16 arithmetic is wrong)")
    return None
