"""Choosing the write backend, with the reasons a backend cannot take a call.

`GRADMEM_FAST_BACKEND` (auto | fast | reference) overrides the `backend` argument, for debugging.
"fast" raises with every reason the fast engine cannot reproduce the reference on this call.
"auto" falls back to the reference with a warning naming such reasons (once per distinct reason);
without them it takes the fast engine on CUDA devices and the reference elsewhere, silently: off CUDA
the engine runs the PyTorch twins of its kernels and was measured slower than the reference (see
`explain`, which says which backend a call gets and why).
"""
import os
from dataclasses import dataclass

import torch

from .backends import ENV_WRITE_BACKEND as ENV_BACKEND
from .backends import WRITE_BACKENDS as BACKENDS
from .backends import warn_once


# config fields that hold a dropout probability; summary_* and classifier_* feed heads a causal LM lacks
_DROPOUT_WORDS = ("dropout", "pdrop")
_DROPOUT_UNUSED_PREFIXES = ("summary_", "classifier_")
# attention implementations whose transformers function the engine's attention reproduces (softmax
# attention, causal mask, the model's scaling), with the function transformers registers for each
_BUILTIN_ATTENTION = {
    "sdpa": "sdpa_attention_forward",
    "flash_attention_2": "flash_attention_forward",
    "flash_attention_3": "flash_attention_forward",
    "flash_attention_4": "flash_attention_forward",
    "flex_attention": "flex_attention_forward",
}


class BackendUnavailable(RuntimeError):
    """The requested backend cannot run this call; the message lists every reason."""


@dataclass(frozen=True)
class BackendChoice:
    """Which backend a write gets. blockers: why the fast engine cannot reproduce the reference on this
    call (auto warns and falls back; fast raises). preference: why auto prefers the reference although
    the fast engine could run (not a warning), or None."""
    requested: str
    backend: str
    blockers: tuple
    preference: str = None

    def __str__(self):
        text = f"backend={self.requested!r} runs the {self.backend} backend"
        if self.blockers:
            return text + ": the fast engine cannot take this call: " + "; ".join(self.blockers)
        if self.preference:
            return text + ": " + self.preference
        return text


def requested_backend(backend):
    forced = os.environ.get(ENV_BACKEND)
    if forced:
        if forced not in BACKENDS:
            raise ValueError(f"{ENV_BACKEND}={forced!r} is not one of {BACKENDS}")
        return forced
    return backend


def dropout_reason(model):
    """Why the model would apply dropout (the fast engine never does), or None."""
    found = []
    if model.training:
        config = model.config.to_dict() if hasattr(model.config, "to_dict") else vars(model.config)
        for key, value in sorted(config.items()):
            if (any(w in key for w in _DROPOUT_WORDS) and not key.startswith(_DROPOUT_UNUSED_PREFIXES)
                    and isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0):
                found.append(f"config {key}={value}")
    for name, module in model.named_modules():
        if module.training and isinstance(module, torch.nn.modules.dropout._DropoutNd) and module.p > 0:
            found.append(f"{name or 'model'} = {type(module).__name__}(p={module.p})")
            break  # one module is enough to name
    if not found:
        return None
    return ("the model is in training mode with dropout (" + ", ".join(found) + "), which the fast engine does not "
            "apply; call model.eval() for a deterministic write, or use backend='reference' to keep dropout")


def attention_reason(model):
    """Why the model's attention is not one the engine reproduces, or None."""
    implementation = getattr(model.config, "_attn_implementation", None)
    if implementation in (None, "eager"):
        custom = _registered_attention("eager")
        if custom is None:
            return None
        return f"attention 'eager' is replaced by a registered function {_name_of(custom)}"
    if implementation not in _BUILTIN_ATTENTION:
        return (f"attention implementation {implementation!r} is not one of the built-in ones the fast engine "
                f"reproduces (eager, {', '.join(_BUILTIN_ATTENTION)})")
    function = _registered_attention(implementation)
    module = getattr(function, "__module__", "") or ""
    if (function is None or not module.startswith("transformers.integrations.")
            or getattr(function, "__name__", None) != _BUILTIN_ATTENTION[implementation]):
        return (f"attention {implementation!r} is registered as {_name_of(function)}, not transformers' own "
                "function, which the fast engine reproduces")
    return None


def _registered_attention(name):
    try:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    except ImportError:
        return None
    return ALL_ATTENTION_FUNCTIONS.get(name) if name in ALL_ATTENTION_FUNCTIONS else None


def _name_of(function):
    if function is None:
        return "nothing"
    return f"{getattr(function, '__module__', '?')}.{getattr(function, '__qualname__', repr(function))}"


def device_preference(model):
    """Why auto takes the reference although the fast engine could run (devices other than CUDA), or None."""
    device = next(model.parameters()).device
    if device.type == "cuda":
        return None
    return (f"on {device.type} the fast engine runs the PyTorch twins of its kernels (no Triton, no CUDA graphs) "
            "and was measured slower than the reference, so auto takes the reference; backend='fast' still runs "
            "the engine")


def fast_reasons(model, memory, *, write_head, memory_proj, grad_mode, seq_len=None, return_losses=False):
    """Why the fast engine cannot take this call: a list of strings, empty when it can."""
    reasons = []
    for reason in (dropout_reason(model), attention_reason(model)):
        if reason is not None:
            reasons.append(reason)
    try:
        from . import engine
    except ImportError as exc:
        return reasons + [f"the fast engine could not be imported ({exc})"]
    reason = engine.fast_reason(model, memory, write_head=write_head, memory_proj=memory_proj,
                                grad_mode=grad_mode, seq_len=seq_len, return_losses=return_losses)
    if reason is not None and reason not in reasons:
        reasons.append(reason)
    return reasons


def decide(backend, model, memory, *, write_head, memory_proj, grad_mode, seq_len=None, return_losses=False):
    """The BackendChoice for this call, without warning or raising. seq_len: memory rows + context tokens."""
    backend = requested_backend(backend)
    if backend == "reference":
        return BackendChoice(backend, "reference", ())
    blockers = tuple(fast_reasons(model, memory, write_head=write_head, memory_proj=memory_proj,
                                  grad_mode=grad_mode, seq_len=seq_len, return_losses=return_losses))
    if blockers:
        return BackendChoice(backend, "reference", blockers)
    preference = device_preference(model) if backend == "auto" else None
    return BackendChoice(backend, "reference" if preference else "fast", (), preference)


def choose_write_backend(backend, model, memory, *, write_head, memory_proj, grad_mode, seq_len=None,
                         return_losses=False):
    """'fast' or 'reference' for this call; raises for backend='fast' when the engine cannot take it."""
    choice = decide(backend, model, memory, write_head=write_head, memory_proj=memory_proj, grad_mode=grad_mode,
                    seq_len=seq_len, return_losses=return_losses)
    if not choice.blockers:
        return choice.backend
    message = "; ".join(choice.blockers)
    if choice.requested == "fast":
        raise BackendUnavailable(f"backend='fast' cannot run this write: {message}")
    warn_once(("write", message), f"gradmem_fast.write falls back to the reference backend: {message}",
              stacklevel=3)
    return "reference"
