"""Residual add + norm and the grouped q/k RMS norm as ops differentiable twice, their double backward written
out (derivation: norm_double_backward.md).

    y, residual_out, stats = add_norm_op(x, residual, weight, bias, eps, kind, backend="auto")
    dx = add_norm_backward_op(dy, residual_out, weight, eps, kind, backend="auto")
    y, rstd = qk_norm_op(x, weight, eps, backend="auto")
    dx = qk_norm_backward_op(dy, x, weight, eps, backend="auto")

The forward values are those of the first-order public functions run with the op's backend:
`add_norm.add_norm_forward` / `add_norm_backward` (CUDA C++ kernels on CUDA, their twins elsewhere) and
`qk_norm.qk_norm_forward` / `qk_norm_backward` (Triton kernels on CUDA or under the Triton interpreter); the
backward ops take the row statistics their forward op returned for the same input (`stats=`, `rstd=`), else
from a forward call on it. The twins compute in float32 (float64 for float64 inputs), results in the input
dtype. The forward ops are differentiable in the input(s), weight and bias; their backward calls the backward
op and plain torch ops, so it is differentiable again. `stats` and `rstd` are returned non-differentiable. The
backward ops' derivatives recompute the row statistics from their input (a `stats` / `rstd` given is used for
the values only), so they are total; their autograd nodes save only their three tensor inputs (the forward
ops' nodes: residual_out, weight and stats; x, weight and rstd). The backward ops' own backward is the written
double backward, `add_norm_double_backward` / `qk_norm_double_backward`: a row-wise Triton kernel
(kernels/norm_double_backward.py) where it can run, else the `*_double_backward_reference` twins. Under
create_graph (grad mode on inside the backward) it is the twin, plain torch ops, which autograd can
differentiate once more (a third derivative).

backend (every op and double backward here): "auto" takes the kernels where they can run, else the twins (a
warning once per reason, none where a kernel does not run by design, e.g. CPU tensors without the
interpreter); "kernel" raises RuntimeError where one cannot run (so `add_norm_op` / `add_norm_backward_op` with "kernel" need the
CUDA C++ kernels of add_norm.py for their first-order values); "reference" takes the twins throughout. The
double-backward kernel takes float32, float16 and bfloat16 (bfloat16 not under the interpreter), rows up to
kernels/norm_double_backward.py's MAX_D long and up to its MAX_GROUPS q/k groups.
"""
import math

import torch

from .._triton import KERNEL_DTYPES, elementwise_reason, interpreter_on
from ..backends import check_op_backend, on_host, use_kernel
from .add_norm import KINDS, add_norm_backward, add_norm_backward_reference, add_norm_forward
from .dtypes import acc_dtype
from .qk_norm import _rows3 as _qk_rows3
from .qk_norm import qk_norm_backward, qk_norm_backward_reference, qk_norm_forward


def _row_stats(h, eps, kind):
    """(mean, rstd) per row of h (rows, d) in h's dtype, the operations of add_norm_forward_reference."""
    if kind == "rms":
        return torch.zeros(h.shape[0], dtype=h.dtype, device=h.device), torch.rsqrt(h.square().mean(-1) + eps)
    mean = h.mean(-1)
    return mean, torch.rsqrt((h - mean[:, None]).square().mean(-1) + eps)


def _xhat_rows(residual_out, eps, kind):
    """The normalised rows (rows, d) of residual_out in the acc dtype, differentiable."""
    h = residual_out.reshape(-1, residual_out.shape[-1]).to(acc_dtype(residual_out.dtype))
    mean, rstd = _row_stats(h, eps, kind)
    return (h - mean[:, None]) * rstd[:, None]


def _rms_double_backward(h, g, u, eps):
    """RMS norm of the rows of h (..., d), g = dy * w, u the cotangent of dx = r (g - xhat mean(g xhat)):
    (g_bar, h_bar, r, xhat), all in h's dtype. The steps are in norm_double_backward.md."""
    r = torch.rsqrt(h.square().mean(-1, keepdim=True) + eps)
    xhat = h * r
    a = (u * xhat).mean(-1, keepdim=True)
    b = (u * g).mean(-1, keepdim=True)
    c = (g * xhat).mean(-1, keepdim=True)
    g_bar = r * (u - a * xhat)
    h_bar = -r.square() * (c * u + a * g + (b - 3.0 * a * c) * xhat)
    return g_bar, h_bar, r, xhat


# ---------------------------------------------------------------- pure-PyTorch twins of the written rules


def add_norm_backward_op_reference(dy, residual_out, weight, eps, kind, d_residual_out=None):
    """dx like residual_out: add_norm_backward_reference(dy, d_residual_out, residual_out, weight, stats, kind)
    with stats recomputed from residual_out (d_residual_out, when given, added before the one rounding)."""
    h = residual_out.reshape(-1, residual_out.shape[-1]).to(acc_dtype(residual_out.dtype))
    stats = torch.stack(_row_stats(h, eps, kind), dim=1)
    return add_norm_backward_reference(dy, d_residual_out, residual_out, weight, stats, kind)


def add_norm_double_backward_reference(dy, residual_out, weight, eps, kind, g_dx):
    """(dy_bar like dy, residual_out_bar like residual_out, weight_bar like weight): the cotangents of
    <g_dx, dx> with dx = add_norm_backward_op_reference(dy, residual_out, weight, eps, kind)."""
    d = residual_out.shape[-1]
    acc = acc_dtype(residual_out.dtype)
    h = residual_out.reshape(-1, d).to(acc)
    dyf, u, w = dy.reshape(-1, d).to(acc), g_dx.reshape(-1, d).to(acc), weight.to(acc)
    g = dyf * w
    if kind == "rms":
        g_bar, h_bar, _, _ = _rms_double_backward(h, g, u, eps)
    else:  # the RMS rule on the centred rows, plus the mean(g) term of dx, then the centring's adjoint
        g_bar, h_bar, r, xhat = _rms_double_backward(h - h.mean(-1, keepdim=True), g, u, eps)
        u_mean, g_mean = u.mean(-1, keepdim=True), g.mean(-1, keepdim=True)
        g_bar = g_bar - r * u_mean
        h_bar = h_bar + r.square() * (g_mean * u_mean) * xhat
        h_bar = h_bar - h_bar.mean(-1, keepdim=True)
    return ((g_bar * w).to(dy.dtype).reshape(dy.shape), h_bar.to(residual_out.dtype).reshape(residual_out.shape),
            (g_bar * dyf).sum(0).to(weight.dtype))


def qk_norm_backward_op_reference(dy, x, weight, eps):
    """dx like x: qk_norm_backward_reference(dy, x, weight, rstd) with rstd recomputed from x."""
    return qk_norm_backward_reference(dy, x, weight, torch.rsqrt(x.to(acc_dtype(x.dtype)).square().mean(-1) + eps))


def qk_norm_double_backward_reference(dy, x, weight, eps, g_dx):
    """(dy_bar like dy, x_bar like x, weight_bar like weight (G, D)): the cotangents of <g_dx, dx> with
    dx = qk_norm_backward_op_reference(dy, x, weight, eps)."""
    acc = acc_dtype(x.dtype)
    dyf, w = dy.to(acc), weight.to(acc)
    g_bar, h_bar, _, _ = _rms_double_backward(x.to(acc), dyf * w, g_dx.to(acc), eps)
    G, D = x.shape[-2:]
    return (g_bar * w).to(dy.dtype), h_bar.to(x.dtype), (g_bar * dyf).reshape(-1, G, D).sum(0).to(weight.dtype)


# ---------------------------------------------------------------- the double backward: kernel or twin


def double_backward_kernel_reason(dy, h, weight, g_dx):
    """None when the double-backward Triton kernel can take these tensors (h the norm's input: residual_out,
    or the q/k norm's x; weight (d,) or (G, D)), else the backends.Reason (by design where Triton does not run
    on them, as _triton.elementwise_reason says)."""
    why = elementwise_reason(h, dy, weight, g_dx)
    if why is not None:
        return why
    for name, t in (("dy", dy), ("weight", weight), ("g_dx", g_dx)):
        if t.dtype not in KERNEL_DTYPES:
            return f"{name} dtype {t.dtype} (the kernel takes float32, float16, bfloat16)"
        if t.dtype == torch.bfloat16 and t.device.type == "cpu" and interpreter_on():
            return on_host("bfloat16 under the Triton interpreter (its bfloat16 arithmetic is wrong)")
    from ..kernels.norm_double_backward import MAX_D, MAX_GROUPS  # triton is importable here

    if h.shape[-1] > MAX_D:
        return f"row length {h.shape[-1]} (the kernel takes rows up to {MAX_D})"
    if weight.dim() == 2 and weight.shape[0] > MAX_GROUPS:
        return f"{weight.shape[0]} groups (the kernel takes up to {MAX_GROUPS})"
    return None


def _launch_double_backward(dy, h, weight, g_dx, eps, is_layer):
    from ..kernels.norm_double_backward import norm_double_backward

    dy_bar, h_bar, weight_bar = norm_double_backward(dy, h, weight, g_dx, eps, is_layer)
    return dy_bar, h_bar, weight_bar.to(weight.dtype)


def add_norm_double_backward(dy, residual_out, weight, eps, kind, g_dx, *, backend="auto", validate=True):
    """(dy_bar like dy, residual_out_bar like residual_out, weight_bar like weight), the values of
    add_norm_double_backward_reference: the Triton kernel where it can run (double_backward_kernel_reason),
    else the twin. dy, residual_out, g_dx (..., d) of one shape and dtype, any strides; weight (d,)."""
    if validate:
        check_op_backend(backend)
        _check_add_norm(residual_out, "residual_out", weight, None, eps, kind, (("dy", dy), ("g_dx", g_dx)))
    why = None if backend == "reference" else double_backward_kernel_reason(dy, residual_out, weight, g_dx)
    if use_kernel(backend, "add_norm_double_backward", why, "Triton kernel"):
        return _launch_double_backward(dy, residual_out, weight, g_dx, eps, kind == "layer")
    return add_norm_double_backward_reference(dy, residual_out, weight, eps, kind, g_dx)


def qk_norm_double_backward(dy, x, weight, eps, g_dx, *, backend="auto", validate=True):
    """(dy_bar like dy, x_bar like x, weight_bar like weight (G, D)), the values of
    qk_norm_double_backward_reference: the Triton kernel where it can run, else the twin. dy, x, g_dx
    (..., G, D) of one shape and dtype, any strides (views of a wider (B, S, heads, D) tensor are read in
    place)."""
    if validate:
        check_op_backend(backend)
        _check_qk_norm(x, weight, eps, (("dy", dy), ("g_dx", g_dx)))
    why = None if backend == "reference" else double_backward_kernel_reason(dy, x, weight, g_dx)
    if use_kernel(backend, "qk_norm_double_backward", why, "Triton kernel"):
        return _launch_double_backward(dy, x, weight, g_dx, eps, False)
    return qk_norm_double_backward_reference(dy, x, weight, eps, g_dx)


# ---------------------------------------------------------------- autograd Functions


class _AddNormBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, dy, residual_out, weight, eps, kind, d_residual_out, backend, stats):
        ctx.eps, ctx.kind, ctx.backend = eps, kind, backend
        ctx.d_residual_dtype = None if d_residual_out is None else d_residual_out.dtype
        ctx.save_for_backward(dy, residual_out, weight)
        if stats is None:
            stats = add_norm_forward(residual_out, None, weight, None, eps, kind, backend=backend,
                                     validate=False)[2]
        return add_norm_backward(dy, d_residual_out, residual_out, weight, stats, kind, backend=backend,
                                 validate=False)

    @staticmethod
    def backward(ctx, g_dx):
        dy, residual_out, weight = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph: the twin, differentiable once more
            bars = add_norm_double_backward_reference(dy, residual_out, weight, ctx.eps, ctx.kind, g_dx)
        else:
            bars = add_norm_double_backward(dy, residual_out, weight, ctx.eps, ctx.kind, g_dx, backend=ctx.backend,
                                            validate=False)
        d_residual_bar = None if ctx.d_residual_dtype is None else g_dx.to(ctx.d_residual_dtype)
        return (*bars, None, None, d_residual_bar, None, None)


class _AddNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, residual, weight, bias, eps, kind, backend):
        ctx.eps, ctx.kind, ctx.backend = eps, kind, backend
        ctx.has_residual, ctx.bias_dtype = residual is not None, None if bias is None else bias.dtype
        y, residual_out, stats = add_norm_forward(x, residual, weight, bias, eps, kind, backend=backend,
                                                  validate=False)
        ctx.save_for_backward(residual_out, weight, stats)
        ctx.mark_non_differentiable(stats)
        return y, residual_out, stats

    @staticmethod
    def backward(ctx, dy, d_residual_out, _):
        residual_out, weight, stats = ctx.saved_tensors
        dh = _AddNormBackward.apply(dy, residual_out, weight, ctx.eps, ctx.kind, d_residual_out, ctx.backend, stats)
        d = residual_out.shape[-1]
        dy_rows = dy.reshape(-1, d).to(acc_dtype(residual_out.dtype))
        dw = (dy_rows * _xhat_rows(residual_out, ctx.eps, ctx.kind)).sum(0).to(weight.dtype)
        db = None if ctx.bias_dtype is None else dy_rows.sum(0).to(ctx.bias_dtype)
        return dh, dh if ctx.has_residual else None, dw, db, None, None, None


class _QKNormBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, dy, x, weight, eps, backend, rstd):
        ctx.eps, ctx.backend = eps, backend
        ctx.save_for_backward(dy, x, weight)
        G, D = x.shape[-2:]
        if _qk_rows3(dy, G, D) is None:  # e.g. an expanded cotangent: the first-order kernel reads (N, G, D) views
            dy = dy.contiguous()
        if rstd is None:
            rstd = qk_norm_forward(x, weight, eps, backend=backend, validate=False)[1]
        return qk_norm_backward(dy, x, weight, rstd, backend=backend, validate=False)

    @staticmethod
    def backward(ctx, g_dx):
        dy, x, weight = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph: the twin, differentiable once more
            bars = qk_norm_double_backward_reference(dy, x, weight, ctx.eps, g_dx)
        else:
            bars = qk_norm_double_backward(dy, x, weight, ctx.eps, g_dx, backend=ctx.backend, validate=False)
        return (*bars, None, None, None)


class _QKNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps, backend):
        ctx.eps, ctx.backend = eps, backend
        y, rstd = qk_norm_forward(x, weight, eps, backend=backend, validate=False)
        ctx.save_for_backward(x, weight, rstd)
        ctx.mark_non_differentiable(rstd)
        return y, rstd

    @staticmethod
    def backward(ctx, dy, _):
        x, weight, rstd = ctx.saved_tensors
        acc = acc_dtype(x.dtype)
        xf = x.to(acc)
        xhat = xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + ctx.eps)
        dw = (dy.to(acc) * xhat).reshape(-1, *weight.shape).sum(0).to(weight.dtype)
        return _QKNormBackward.apply(dy, x, weight, ctx.eps, ctx.backend, rstd), dw, None, None


# ---------------------------------------------------------------- validation


def _check_eps(eps):
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps <= 0:
        raise ValueError(f"eps must be a positive finite number, got {eps!r}")


def _check_tensor(name, t, ref=None, ref_name=None):
    if not isinstance(t, torch.Tensor) or not t.is_floating_point():
        raise ValueError(f"{name} must be a floating tensor, got {getattr(t, 'dtype', type(t).__name__)}")
    if ref is not None and (t.shape != ref.shape or t.dtype != ref.dtype or t.device != ref.device):
        raise ValueError(f"{name} ({t.dtype} {tuple(t.shape)} on {t.device}) must match {ref_name} "
                         f"({ref.dtype} {tuple(ref.shape)} on {ref.device})")


def _check_param(name, t, shape, x, x_name):
    _check_tensor(name, t)
    if tuple(t.shape) != tuple(shape) or t.device != x.device:
        raise ValueError(f"{name} must be a {tuple(shape)} tensor on {x.device} (from {x_name} "
                         f"{tuple(x.shape)}), got {tuple(t.shape)} on {t.device}")


def _check_add_norm(x, x_name, weight, bias, eps, kind, others):
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    _check_eps(eps)
    _check_tensor(x_name, x)
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"{x_name} must have a non-empty last dimension, got shape {tuple(x.shape)}")
    for name, t in others:
        _check_tensor(name, t, x, x_name)
    for name, t in (("weight", weight),) + ((("bias", bias),) if bias is not None else ()):
        _check_param(name, t, x.shape[-1:], x, x_name)


def _check_qk_norm(x, weight, eps, others):
    _check_eps(eps)
    _check_tensor("x", x)
    if x.dim() < 2:
        raise ValueError(f"x must have shape (..., G, D), got {tuple(x.shape)}")
    for name, t in others:
        _check_tensor(name, t, x, "x")
    _check_param("weight", weight, x.shape[-2:], x, "x")


# ---------------------------------------------------------------- public functions


def add_norm_op(x, residual, weight, bias, eps, kind, *, backend="auto", validate=True):
    """(y, residual_out, stats) as add_norm.add_norm_forward(..., backend=backend); differentiable in x,
    residual, weight and bias (stats is not), with backward add_norm_backward_op, itself differentiable."""
    if validate:
        check_op_backend(backend)
        _check_add_norm(x, "x", weight, bias, eps, kind, (("residual", residual),) if residual is not None else ())
    return _AddNorm.apply(x, residual, weight, bias, float(eps), kind, backend)


def add_norm_backward_op(dy, residual_out, weight, eps, kind, d_residual_out=None, *, stats=None, backend="auto",
                         validate=True):
    """dx like residual_out, the norm's input gradient of dy plus
    d_residual_out when given (added in the accumulation dtype, as add_norm_backward_reference adds it), by
    add_norm.add_norm_backward(..., backend=backend); differentiable in dy, residual_out, weight (the written
    double backward, add_norm_double_backward) and d_residual_out. stats: the (rows, 2) statistics add_norm_op
    returned for this residual_out (its values only; the derivatives recompute them), else a forward call
    computes them."""
    if validate:
        check_op_backend(backend)
        others = (("dy", dy),) + ((("d_residual_out", d_residual_out),) if d_residual_out is not None else ())
        _check_add_norm(residual_out, "residual_out", weight, None, eps, kind, others)
    return _AddNormBackward.apply(dy, residual_out, weight, float(eps), kind, d_residual_out, backend,
                                  None if stats is None else stats.detach())


def qk_norm_op(x, weight, eps, *, backend="auto", validate=True):
    """(y, rstd) as qk_norm.qk_norm_forward(..., backend=backend), x (..., G, D), weight (G, D); differentiable
    in x and weight (rstd is not), with backward qk_norm_backward_op."""
    if validate:
        check_op_backend(backend)
        _check_qk_norm(x, weight, eps, ())
    return _QKNorm.apply(x, weight, float(eps), backend)


def qk_norm_backward_op(dy, x, weight, eps, *, rstd=None, backend="auto", validate=True):
    """dx like x, by qk_norm.qk_norm_backward(..., backend=backend); differentiable in dy, x and weight by the
    written double backward (qk_norm_double_backward). rstd: what qk_norm_op returned for this x (its values
    only), else a forward call computes it."""
    if validate:
        check_op_backend(backend)
        _check_qk_norm(x, weight, eps, (("dy", dy),))
    return _QKNormBackward.apply(dy, x, weight, float(eps), backend, None if rstd is None else rstd.detach())


__all__ = ["add_norm_backward_op", "add_norm_backward_op_reference",
           "add_norm_double_backward", "add_norm_double_backward_reference", "add_norm_op",
           "double_backward_kernel_reason", "qk_norm_backward_op", "qk_norm_backward_op_reference",
           "qk_norm_double_backward", "qk_norm_double_backward_reference", "qk_norm_op"]
