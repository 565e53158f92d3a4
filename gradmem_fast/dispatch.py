"""Choosing the write backend, with the reasons a backend cannot take a call.

`GRADMEM_FAST_BACKEND` (auto | fast | reference) overrides the `backend` argument, for debugging.
"auto" takes the fast engine when it can and otherwise falls back to the reference with a warning
naming the reason (once per distinct reason); "fast" raises with every reason.
"""
import os
import warnings

from .validation import BACKENDS

ENV_BACKEND = "GRADMEM_FAST_BACKEND"
_warned = set()


class BackendUnavailable(RuntimeError):
    """The requested backend cannot run this call; the message lists every reason."""


def requested_backend(backend):
    forced = os.environ.get(ENV_BACKEND)
    if forced:
        if forced not in BACKENDS:
            raise ValueError(f"{ENV_BACKEND}={forced!r} is not one of {BACKENDS}")
        return forced
    return backend


def fast_reasons(model, memory, *, write_head, memory_proj, grad_mode, seq_len=None):
    """Why the fast engine cannot take this call: a list of strings, empty when it can."""
    reasons = []
    try:
        from . import engine
    except ImportError as exc:
        return reasons + [f"the fast engine could not be imported ({exc})"]
    if not hasattr(engine, "fast_reason"):
        return reasons + ["the fast engine is not built into this version"]
    reason = engine.fast_reason(model, memory, write_head=write_head, memory_proj=memory_proj,
                                grad_mode=grad_mode, seq_len=seq_len)
    if reason is not None and reason not in reasons:
        reasons.append(reason)
    return reasons


def choose_write_backend(backend, model, memory, *, write_head, memory_proj, grad_mode, seq_len=None):
    """'fast' or 'reference' for this call. seq_len: memory rows + context tokens."""
    backend = requested_backend(backend)
    if backend == "reference":
        return "reference"
    reasons = fast_reasons(model, memory, write_head=write_head, memory_proj=memory_proj,
                           grad_mode=grad_mode, seq_len=seq_len)
    if not reasons:
        return "fast"
    message = "; ".join(reasons)
    if backend == "fast":
        raise BackendUnavailable(f"backend='fast' cannot run this write: {message}")
    if message not in _warned:
        _warned.add(message)
        warnings.warn(f"gradmem_fast.write falls back to the reference backend: {message}", stacklevel=3)
    return "reference"
