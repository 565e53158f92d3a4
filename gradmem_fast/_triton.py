"""Whether a Triton kernel can run on given tensors, with the reason when it cannot."""
import functools
import os


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
