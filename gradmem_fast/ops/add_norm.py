"""Fused residual add + RMSNorm / LayerNorm, forward and input-gradient backward.

Weights are frozen: the backward returns only the gradient of the normalised input (the
residual stream), never a weight or bias gradient. Derivation: fused_ops.md.
"""
import torch

from .. import _ext
from .dtypes import acc_dtype

KINDS = ("rms", "layer")


# ---------------------------------------------------------------- pure-PyTorch twins


def add_norm_forward_reference(x, residual, weight, bias, eps, kind):
    """y, residual_out, stats. x, residual (..., d); weight, bias (d,); stats (rows, 2) = (mean, rstd)
    in float32 (float64 for float64 inputs); mean is 0 for kind "rms"."""
    residual_out = x if residual is None else (x + residual)
    acc = acc_dtype(x.dtype)
    h = residual_out.reshape(-1, x.shape[-1]).to(acc)
    if kind == "rms":
        mean = torch.zeros(h.shape[0], dtype=acc, device=h.device)
        rstd = torch.rsqrt(h.square().mean(-1) + eps)
        xhat = h * rstd[:, None]
    else:
        mean = h.mean(-1)
        centred = h - mean[:, None]
        rstd = torch.rsqrt(centred.square().mean(-1) + eps)
        xhat = centred * rstd[:, None]
    y = xhat * weight.to(acc)
    if bias is not None:
        y = y + bias.to(acc)
    stats = torch.stack([mean, rstd], dim=1)
    return y.to(x.dtype).reshape(x.shape), residual_out, stats


def add_norm_backward_reference(dy, d_residual_out, residual_out, weight, stats, kind):
    """Gradient w.r.t. residual_out: norm input-gradient of dy plus d_residual_out (may be None, and may
    have any strides)."""
    d = residual_out.shape[-1]
    acc = acc_dtype(residual_out.dtype)
    h = residual_out.reshape(-1, d).to(acc)
    mean, rstd = stats[:, 0:1].to(acc), stats[:, 1:2].to(acc)
    xhat = (h - mean) * rstd
    g = dy.reshape(-1, d).to(acc) * weight.to(acc)
    dx = g - xhat * (g * xhat).mean(-1, keepdim=True)
    if kind == "layer":
        dx = dx - g.mean(-1, keepdim=True)
    dx = dx * rstd
    if d_residual_out is not None:
        dx = dx + d_residual_out.reshape(-1, d).to(acc)
    return dx.to(residual_out.dtype).reshape(residual_out.shape)


# ---------------------------------------------------------------- host launchers


def _mixed_dtypes(ref, *tensors):
    for t in tensors:
        if t is not None and t.dtype != ref.dtype:
            return f"mixed dtypes {ref.dtype} and {t.dtype} (the kernel takes one dtype)"
    return None


def _rows(t):
    return t.reshape(-1, t.shape[-1]).contiguous()


def _strided_rows(t):
    """t (..., d) as a (rows, d) or (n, rows // n, d) view with its last dimension contiguous, as the backward
    kernel takes d_residual_out (e.g. the first m rows of each sample of a (B, S, d) buffer: no copy); a
    contiguous copy where no such view exists."""
    d = t.shape[-1]
    if t.dim() >= 2 and (d == 1 or t.stride(-1) == 1):
        for shape in ((-1, d), (-1, t.shape[-2], d)):
            try:
                return t.view(shape)
            except RuntimeError:
                pass
    return _rows(t)


def _launch_forward(x, residual, weight, bias, eps, kind, out):
    d = x.shape[-1]
    x2 = _rows(x)
    rows = x2.shape[0]
    if out is None:
        y = torch.empty_like(x2)
        res_out = x if residual is None else torch.empty(x.shape, dtype=x.dtype, device=x.device)
        stats = torch.empty(rows, 2, dtype=torch.float32, device=x.device)
    else:
        y, res_out, stats = out
        if residual is None:
            res_out = x
    res2 = None if residual is None else _rows(residual)
    res_out2 = x2.new_empty(0) if residual is None else res_out.view(rows, d)
    _ext.load().add_norm_fwd(x2, res2, weight.contiguous(), None if bias is None else bias.contiguous(),
                             float(eps), kind == "rms", y.view(rows, d), res_out2, stats)
    return (y.view(x.shape) if out is None else y), res_out, stats  # out's own tensors, as the twin


def _launch_backward(dy, d_residual_out, residual_out, weight, stats, kind, out):
    d = residual_out.shape[-1]
    h = _rows(residual_out)
    dx = torch.empty_like(h) if out is None else out
    _ext.load().add_norm_bwd(_rows(dy), None if d_residual_out is None else _strided_rows(d_residual_out), h,
                             weight.contiguous(), stats.contiguous(), kind == "rms", dx.view(-1, d))
    return dx.view(residual_out.shape) if out is None else dx


# ---------------------------------------------------------------- validation


def _check_out(name, t, shape, dtype, device):
    if t.shape != shape or t.dtype != dtype or t.device != device or not t.is_contiguous():
        raise ValueError(f"{name} must be a contiguous {dtype} tensor of shape {tuple(shape)} on {device}, "
                         f"got {t.dtype} {tuple(t.shape)} on {t.device} (contiguous={t.is_contiguous()})")


def _check_common(x, weight, kind, name="x"):
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"{name} must have a non-empty last dimension, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be floating point, got {x.dtype}")
    d = x.shape[-1]
    if weight.shape != (d,):
        raise ValueError(f"weight must have shape ({d},), got {tuple(weight.shape)}")
    if weight.device != x.device:
        raise ValueError(f"weight is on {weight.device}, {name} on {x.device}")


def _check_like(name, t, ref, ref_name):
    if t.shape != ref.shape or t.dtype != ref.dtype or t.device != ref.device:
        raise ValueError(f"{name} ({t.dtype} {tuple(t.shape)} on {t.device}) must match {ref_name} "
                         f"({ref.dtype} {tuple(ref.shape)} on {ref.device})")


# ---------------------------------------------------------------- public functions


def add_norm_forward(x, residual, weight, bias, eps, kind, *, out=None, backend="auto", validate=True):
    """residual_out = x + residual (x itself when residual is None); y = norm(residual_out) in x's dtype.

    Returns (y, residual_out, stats), stats (rows, 2) float32 = (mean, rstd) per row, mean 0 for
    kind "rms". `out=(y, residual_out, stats)` reuses preallocated buffers (residual_out is ignored
    when residual is None).
    """
    if validate:
        _check_common(x, weight, kind)
        if residual is not None:
            _check_like("residual", residual, x, "x")
        if bias is not None:
            _check_like("bias", bias, weight, "weight")
        if not float(eps) > 0.0:
            raise ValueError(f"eps must be positive, got {eps}")
        if out is not None:
            rows = x.numel() // x.shape[-1]
            _check_out("out[0] (y)", out[0], x.shape, x.dtype, x.device)
            if residual is not None:
                _check_out("out[1] (residual_out)", out[1], x.shape, x.dtype, x.device)
            _check_out("out[2] (stats)", out[2], (rows, 2), torch.float32, x.device)
    if _ext.use_kernel(backend, "add_norm_forward", x, residual, weight, bias,
                       why=_mixed_dtypes(x, residual, weight, bias)):
        return _launch_forward(x, residual, weight, bias, eps, kind, out)
    y, res_out, stats = add_norm_forward_reference(x, residual, weight, bias, eps, kind)
    if out is None:
        return y, res_out, stats
    out[0].copy_(y)
    out[2].copy_(stats)
    if residual is None:
        return out[0], x, out[2]
    out[1].copy_(res_out)
    return out[0], out[1], out[2]


def add_norm_backward(dy, d_residual_out, residual_out, weight, stats, kind, *, out=None, backend="auto",
                      validate=True):
    """Total gradient w.r.t. residual_out (= the gradient of both x and residual):
    norm input-gradient of dy plus d_residual_out (None: nothing arrives from above).

    d_residual_out may be a strided view (its last dimension contiguous), e.g. the first m rows of each
    sample of a (B, S, d) gradient: the kernel reads it in place where its rows form a (rows, d) or
    (n, rows / n, d) view, with no contiguous copy."""
    if validate:
        _check_common(residual_out, weight, kind, name="residual_out")
        _check_like("dy", dy, residual_out, "residual_out")
        if d_residual_out is not None:
            _check_like("d_residual_out", d_residual_out, residual_out, "residual_out")
        rows = residual_out.numel() // residual_out.shape[-1]
        if stats.shape != (rows, 2) or not stats.is_floating_point() or stats.device != residual_out.device:
            raise ValueError(f"stats must be a float tensor of shape ({rows}, 2) on {residual_out.device}, "
                             f"got {stats.dtype} {tuple(stats.shape)} on {stats.device}")
        if out is not None:
            _check_out("out", out, residual_out.shape, residual_out.dtype, residual_out.device)
    why = _mixed_dtypes(residual_out, dy, d_residual_out, weight)
    if why is None and stats.dtype != torch.float32:
        why = f"stats dtype {stats.dtype} (the kernel takes float32)"
    if _ext.use_kernel(backend, "add_norm_backward", dy, d_residual_out, residual_out, weight, stats, why=why):
        return _launch_backward(dy, d_residual_out, residual_out, weight, stats, kind, out)
    dx = add_norm_backward_reference(dy, d_residual_out, residual_out, weight, stats, kind)
    if out is None:
        return dx
    return out.copy_(dx)
