"""Grouped RMS norm of q and k (Qwen3, OLMo 2, Gemma 3), forward and input-gradient backward.

x (..., G, D): every (..., g) row of D values is normalised on its own and scaled by weight[g] (G, D):
    rstd = 1 / sqrt(mean(x^2) + eps),  y = x * rstd * weight        (computed in float32, float64 for float64)
Per-head norms see x as (B, S, H + Hkv, D) with weight rows repeating each head's (D,) weight; norms over a
whole projection see it as (B, S, 1, H * D). Any strides with D contiguous, so q and k can be read and
written as views of a fused projection's output. Weights are frozen: the backward returns only dx.
Derivation: qk_norm.md.
"""
import torch

from .._triton import elementwise_reason
from ..backends import use_kernel
from .dtypes import acc_dtype



# ---------------------------------------------------------------- pure-PyTorch twins


def qk_norm_forward_reference(x, weight, eps):
    """(y like x, rstd (...,) of x.shape[:-1]) in float32 (float64 for float64 inputs)."""
    acc = acc_dtype(x.dtype)
    xf = x.to(acc)
    rstd = torch.rsqrt(xf.square().mean(-1) + eps)
    return (xf * rstd[..., None] * weight.to(acc)).to(x.dtype), rstd


def qk_norm_backward_reference(dy, x, weight, rstd):
    """dx = rstd * (g - xhat * mean(g * xhat)), g = dy * weight, xhat = x * rstd; in x's dtype."""
    acc = acc_dtype(x.dtype)
    r = rstd.to(acc)[..., None]
    xhat = x.to(acc) * r
    g = dy.to(acc) * weight.to(acc)
    return (r * (g - xhat * (g * xhat).mean(-1, keepdim=True))).to(x.dtype)


# ---------------------------------------------------------------- host launchers


def _rows3(t, G, D):
    """t (..., G, D) as an (N, G, D) view (no copy), or None where its leading dims do not flatten."""
    if t.stride(-1) != 1 and D > 1:
        return None
    try:
        return t.view(-1, G, D)
    except RuntimeError:
        return None


def kernel_reason(*tensors):
    """None when the Triton kernels can take these (..., G, D) tensors, else the backends.Reason."""
    why = elementwise_reason(*tensors)
    if why is not None:
        return why
    G, D = tensors[0].shape[-2:]
    for t in tensors:
        if _rows3(t, G, D) is None:
            return f"a tensor of shape {tuple(t.shape)}, strides {t.stride()} has no (N, G, D) view"
    return None


def _launch_forward(x, weight, eps, out):
    from ..kernels.qk_norm import qk_norm_fwd

    G, D = x.shape[-2:]
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device) if out is None else out
    rstd = torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device)
    qk_norm_fwd(_rows3(x, G, D), weight.contiguous(), eps, _rows3(y, G, D), rstd.view(-1))
    return y, rstd


def _launch_backward(dy, x, weight, rstd, out):
    from ..kernels.qk_norm import qk_norm_bwd

    G, D = x.shape[-2:]
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device) if out is None else out
    qk_norm_bwd(_rows3(dy, G, D), _rows3(x, G, D), weight.contiguous(), rstd.contiguous().view(-1),
                _rows3(dx, G, D))
    return dx


# ---------------------------------------------------------------- validation


def _check(x, weight, others, out):
    if not isinstance(x, torch.Tensor) or x.dim() < 2 or not x.is_floating_point():
        raise ValueError(f"x must be a floating tensor of shape (..., G, D), got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    if not isinstance(weight, torch.Tensor) or tuple(weight.shape) != tuple(x.shape[-2:]) \
            or weight.device != x.device or not weight.is_floating_point():
        raise ValueError(f"weight must be a floating {tuple(x.shape[-2:])} tensor on {x.device}, got "
                         f"{tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__}")
    for name, t in others + (() if out is None else (("out", out),)):
        if not isinstance(t, torch.Tensor) or t.shape != x.shape or t.dtype != x.dtype or t.device != x.device:
            raise ValueError(f"{name} must match x ({x.dtype} {tuple(x.shape)} on {x.device}), got "
                             f"{t.dtype} {tuple(t.shape)} on {t.device}" if isinstance(t, torch.Tensor) else
                             f"{name} must be a tensor, got {type(t).__name__}")


# ---------------------------------------------------------------- public functions


def qk_norm_forward(x, weight, eps, *, out=None, backend="auto", validate=True):
    """x (..., G, D), weight (G, D) -> (y like x, rstd x.shape[:-1] float32; float64 for float64 on the twin).
    out: where y is written (any strides with D contiguous), e.g. a view of a larger buffer."""
    if validate:
        _check(x, weight, (), out)
        if not float(eps) > 0.0:
            raise ValueError(f"eps must be positive, got {eps}")
    if use_kernel(backend, "qk_norm_forward", kernel_reason(x, weight, *(() if out is None else (out,))),
                  "Triton kernel"):
        return _launch_forward(x, weight, eps, out)
    y, rstd = qk_norm_forward_reference(x, weight, eps)
    return (y, rstd) if out is None else (out.copy_(y), rstd)


def qk_norm_backward(dy, x, weight, rstd, *, out=None, backend="auto", validate=True):
    """Gradient w.r.t. x of qk_norm_forward given dy (like x) and its rstd: dx like x (written into out)."""
    if validate:
        _check(x, weight, (("dy", dy),), out)
        if not isinstance(rstd, torch.Tensor) or rstd.shape != x.shape[:-1] or not rstd.is_floating_point():
            raise ValueError(f"rstd must be a float tensor of shape {tuple(x.shape[:-1])}, got "
                             f"{tuple(rstd.shape) if isinstance(rstd, torch.Tensor) else type(rstd).__name__}")
    why = kernel_reason(x, dy, weight, *(() if out is None else (out,)))
    if why is None and rstd.dtype != torch.float32:
        why = f"rstd dtype {rstd.dtype} (the kernel takes float32)"
    if use_kernel(backend, "qk_norm_backward", why, "Triton kernel"):
        return _launch_backward(dy, x, weight, rstd, out)
    dx = qk_norm_backward_reference(dy, x, weight, rstd)
    return dx if out is None else out.copy_(dx)
