"""The write step's in-place memory update with optional gradient clipping, without host sync.

memory (B, m, d) -= lr * clip(grad); lr is a float32 device tensor read by the kernel, so a
captured CUDA graph can be replayed with another step size.

`memory_update_op(memory, grad, lr, ...)` is the same update out of place, differentiable in memory and
grad with a written-out backward (`memory_update_backward_reference`: the second-order write's rule for
the update, the clips differentiated as autograd differentiates the twin).
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


def _check_memory(memory):
    if memory.dim() != 3 or not memory.is_floating_point():
        raise ValueError(f"memory must be a float (B, m, d) tensor, got {memory.dtype} {tuple(memory.shape)}")


def _check_clips(clip_value, clip_norm):
    for name, c in (("clip_value", clip_value), ("clip_norm", clip_norm)):
        if c is not None and not float(c) > 0.0:
            raise ValueError(f"{name} must be positive or None, got {c!r}")


def memory_update_(memory, grad, lr, *, clip_value=None, clip_norm=None, backend="auto", validate=True):
    """memory (B, m, d) -= lr * clip(grad) in place; lr a float32 tensor (0-d or (1,)) on the
    memory's device. grad may be overwritten. Returns memory."""
    if validate:
        _check_memory(memory)
        if grad.shape != memory.shape or not grad.is_floating_point() or grad.device != memory.device:
            raise ValueError(f"grad ({grad.dtype} {tuple(grad.shape)} on {grad.device}) must be a float tensor "
                             f"of memory's shape {tuple(memory.shape)} on {memory.device}")
        if not isinstance(lr, torch.Tensor) or lr.numel() != 1 or lr.dim() > 1 or lr.dtype != torch.float32 \
                or lr.device != memory.device:
            raise ValueError(f"lr must be a float32 tensor of shape () or (1,) on {memory.device}, got "
                             + (f"{lr.dtype} {tuple(lr.shape)} on {lr.device}" if isinstance(lr, torch.Tensor)
                                else repr(lr)))
        _check_clips(clip_value, clip_norm)
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


# ---------------------------------------------------------------- differentiable, out of place


def memory_update_backward_reference(grad, lr, d_out, *, clip_value=None, clip_norm=None):
    """Cotangent of grad in M - lr * clip(grad), given d_out (B, m, d) of the result, in grad's dtype.
    As autograd differentiates memory_update__reference: the value clip passes the gradient where
    -clip_value <= g <= clip_value; the norm clip's scale s = min(1, c / (n + eps)), n = ||g_b||, passes
    d(s g) = s dg + <dg, g> ds with ds = -c / (n + eps)^2 dn where c / (n + eps) <= 1 (else 0), and
    dn = <g, dg> / n, 0 for a zero sample."""
    acc = acc_dtype(grad.dtype)
    g = grad.to(acc)
    d = -lr.to(acc).reshape(()) * d_out.to(acc)
    inside = None
    if clip_value is not None:
        inside = (g >= -clip_value) & (g <= clip_value)
        g = g.clamp(-clip_value, clip_value)
    if clip_norm is not None:
        n = g.reshape(g.shape[0], -1).norm(dim=1)
        ratio = clip_norm / (n + NORM_EPS)
        d_ratio = torch.where(ratio <= 1.0, (d * g).reshape(g.shape[0], -1).sum(dim=1), 0.0)
        d_n = -d_ratio * clip_norm / (n + NORM_EPS) ** 2
        d_n_over_n = torch.where(n > 0, d_n / torch.where(n > 0, n, 1.0), 0.0)
        d = d * ratio.clamp(max=1.0)[:, None, None] + d_n_over_n[:, None, None] * g
    if inside is not None:
        d = torch.where(inside, d, 0.0)
    return d.to(grad.dtype)


class _MemoryUpdate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, memory, grad, lr, clip_value, clip_norm):
        ctx.save_for_backward(grad, lr)
        ctx.clips = clip_value, clip_norm
        return memory_update__reference(memory.clone(), grad, lr, clip_value=clip_value, clip_norm=clip_norm)

    @staticmethod
    def backward(ctx, d_out):
        grad, lr = ctx.saved_tensors
        clip_value, clip_norm = ctx.clips
        d_grad = memory_update_backward_reference(grad, lr, d_out, clip_value=clip_value, clip_norm=clip_norm)
        return d_out, d_grad, None, None, None


def memory_update_op(memory, grad, lr, *, clip_value=None, clip_norm=None, validate=True):
    """M - lr * clip(grad), a new tensor (B, m, d) in memory's dtype, differentiable in memory and grad (lr
    is a constant); its backward is memory_update_backward_reference, itself differentiable. Arguments as
    memory_update_; saves grad and lr only."""
    if validate:
        _check_memory(memory)
        if grad.shape != memory.shape or grad.dtype != memory.dtype or grad.device != memory.device:
            raise ValueError(f"grad ({grad.dtype} {tuple(grad.shape)} on {grad.device}) must be like memory "
                             f"({memory.dtype} {tuple(memory.shape)} on {memory.device})")
        if not isinstance(lr, torch.Tensor) or lr.numel() != 1 or lr.dim() > 1:
            raise ValueError(f"lr must be a one-element tensor of shape () or (1,), got {lr!r}")
        if lr.requires_grad:
            raise ValueError("lr requires grad: memory_update_op treats the step size as a constant")
        _check_clips(clip_value, clip_norm)
    return _MemoryUpdate.apply(memory, grad, lr, clip_value, clip_norm)
