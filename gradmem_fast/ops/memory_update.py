"""The write step's in-place memory update with optional gradient clipping, without host sync.

memory (B, m, d) -= lr * clip(grad); lr is a float32 device tensor read by the kernel, so a
captured CUDA graph can be replayed with another step size.
"""
import torch

from .. import _ext
from .dtypes import acc_dtype

NORM_EPS = 1e-6


def memory_update__reference(memory, grad, lr, *, clip_value=None, clip_norm=None):
    """In place: g = grad (float32); clamp to [-clip_value, clip_value]; scale sample b by
    min(1, clip_norm / (||g_b||_2 + 1e-6)); memory -= lr * g in float32 (float64 for float64)."""
    acc = acc_dtype(memory.dtype)
    g = grad.to(acc)
    if clip_value is not None:
        g = g.clamp(-clip_value, clip_value)
    if clip_norm is not None:
        norm = g.reshape(g.shape[0], -1).norm(dim=1)
        scale = (clip_norm / (norm + NORM_EPS)).clamp(max=1.0)
        g = g * scale[:, None, None]
    memory.copy_(memory.to(acc) - lr.to(acc).reshape(()) * g)
    return memory


def memory_update_(memory, grad, lr, *, clip_value=None, clip_norm=None, backend="auto", validate=True):
    """memory (B, m, d) -= lr * clip(grad) in place; lr a float32 tensor (0-d or (1,)) on the
    memory's device. grad may be overwritten. Returns memory."""
    if validate:
        if memory.dim() != 3 or not memory.is_floating_point():
            raise ValueError(f"memory must be a float (B, m, d) tensor, got {memory.dtype} {tuple(memory.shape)}")
        if grad.shape != memory.shape or not grad.is_floating_point() or grad.device != memory.device:
            raise ValueError(f"grad ({grad.dtype} {tuple(grad.shape)} on {grad.device}) must be a float tensor "
                             f"of memory's shape {tuple(memory.shape)} on {memory.device}")
        if not isinstance(lr, torch.Tensor) or lr.numel() != 1 or lr.dim() > 1 or lr.dtype != torch.float32 \
                or lr.device != memory.device:
            raise ValueError(f"lr must be a float32 tensor of shape () or (1,) on {memory.device}, got "
                             + (f"{lr.dtype} {tuple(lr.shape)} on {lr.device}" if isinstance(lr, torch.Tensor)
                                else repr(lr)))
        for name, c in (("clip_value", clip_value), ("clip_norm", clip_norm)):
            if c is not None and not float(c) > 0.0:
                raise ValueError(f"{name} must be positive or None, got {c!r}")
    why = None
    if not memory.is_contiguous():
        why = f"memory is not contiguous (strides {memory.stride()})"
    elif grad.dtype not in (memory.dtype, torch.float32):
        why = f"grad dtype {grad.dtype} with memory dtype {memory.dtype} (the kernel takes the same or float32)"
    if _ext.use_kernel(backend, "memory_update_", memory, grad, lr, why=why):
        _ext.load().memory_update_(memory, grad.contiguous(), lr,
                                   -1.0 if clip_value is None else float(clip_value),
                                   -1.0 if clip_norm is None else float(clip_norm))
        return memory
    return memory_update__reference(memory, grad, lr, clip_value=clip_value, clip_norm=clip_norm)
