"""Which implementation runs an op: its kernel or its PyTorch twin. One policy for every op.

Op backends: "auto" takes the kernel when it can run, else the twin; "kernel" raises RuntimeError with
the reason when the kernel cannot run; "reference" always takes the twin. GRADMEM_FAST_OP_BACKEND sets
the engine's default.

A kernel that cannot take a call says why as a `Reason`. `by_design` marks the cases where the twin is
the intended path rather than a loss: tensors on the CPU for a CUDA-only kernel, or a dtype the Triton
interpreter computes wrongly. "auto" warns once per (op, reason) for every other reason.
"""
import os
import warnings
from typing import NamedTuple, Optional

OP_BACKENDS = ("auto", "kernel", "reference")
ENV_OP_BACKEND = "GRADMEM_FAST_OP_BACKEND"
# gradmem_fast.write(backend=...): the fast engine or the reference, with the same three-way policy
WRITE_BACKENDS = ("auto", "fast", "reference")
ENV_WRITE_BACKEND = "GRADMEM_FAST_BACKEND"


class Reason(NamedTuple):
    text: str
    by_design: bool = False  # the twin is the intended path here: no warning under "auto"


def on_host(text: str) -> Reason:
    """A reason that only says the tensors are where this kernel does not run (e.g. CPU, no interpreter)."""
    return Reason(text, by_design=True)


def as_reason(why) -> Optional[Reason]:
    """None, a Reason, or a plain string (taken as a reason that warns)."""
    if why is None or isinstance(why, Reason):
        return why
    return Reason(str(why))


def check_op_backend(backend, name="backend"):
    """backend itself when it is one of OP_BACKENDS, else ValueError naming it."""
    if backend not in OP_BACKENDS:
        raise ValueError(f"{name} must be one of {OP_BACKENDS}, got {backend!r}")
    return backend


def resolve_op_backend(backend=None):
    """The engine's op backend: `backend`, else GRADMEM_FAST_OP_BACKEND, else "auto"."""
    if backend is None:
        backend = os.environ.get(ENV_OP_BACKEND) or "auto"
        return check_op_backend(backend, ENV_OP_BACKEND)
    return check_op_backend(backend, "op_backend")


_warned = set()


def warn_once(key, message, stacklevel=2):
    """warnings.warn(message) the first time `key` is seen in this process; stacklevel as for warnings.warn,
    counted from the caller of warn_once."""
    if key in _warned:
        return
    _warned.add(key)
    warnings.warn(message, stacklevel=stacklevel + 1)


def use_kernel(backend, op: str, why, kernel: str = "kernel") -> bool:
    """Whether `op` runs its kernel. why: None when the kernel can take the call, else its Reason (a string
    counts as a Reason that warns). kernel names the implementation in messages ("Triton kernel", ...)."""
    check_op_backend(backend)
    if backend == "reference":
        return False
    reason = as_reason(why)
    if reason is None:
        return True
    if backend == "kernel":
        raise RuntimeError(f"{op}: the {kernel} cannot run: {reason.text}")
    if not reason.by_design:
        warn_once((op, reason.text), f"{op}: the {kernel} cannot run ({reason.text}); using the PyTorch twin",
                  stacklevel=3)
    return False
