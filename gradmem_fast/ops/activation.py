"""SwiGLU and GELU, forward and input-gradient backward. The backward recomputes the activation
from its inputs: nothing beyond the inputs is saved. Derivation: fused_ops.md."""
import math

import torch

from .. import _ext
from .dtypes import acc_dtype

APPROXIMATIONS = ("tanh", "none")
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_INV_SQRT_2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_GELU_C = 0.044715


def _acc(t):
    return t.to(acc_dtype(t.dtype))


# ---------------------------------------------------------------- pure-PyTorch twins


def swiglu_forward_reference(gate, up):
    """silu(gate) * up, computed in float32 (float64 for float64 inputs), in gate's dtype."""
    g = _acc(gate)
    return (g * torch.sigmoid(g) * _acc(up)).to(gate.dtype)


def swiglu_backward_reference(dy, gate, up):
    """d_gate = dy * up * s * (1 + gate * (1 - s)), d_up = dy * silu(gate), s = sigmoid(gate)."""
    g, u, dyf = _acc(gate), _acc(up), _acc(dy)
    s = torch.sigmoid(g)
    d_up = dyf * g * s
    d_gate = dyf * u * s * (1.0 + g * (1.0 - s))
    return d_gate.to(gate.dtype), d_up.to(up.dtype)


def gelu_forward_reference(x, approximate):
    xf = _acc(x)
    if approximate == "tanh":
        y = 0.5 * xf * (1.0 + torch.tanh(_SQRT_2_OVER_PI * (xf + _GELU_C * xf ** 3)))
    else:
        y = 0.5 * xf * (1.0 + torch.erf(xf * _INV_SQRT_2))
    return y.to(x.dtype)


def gelu_backward_reference(dy, x, approximate):
    xf, dyf = _acc(x), _acc(dy)
    if approximate == "tanh":
        t = torch.tanh(_SQRT_2_OVER_PI * (xf + _GELU_C * xf ** 3))
        grad = 0.5 * (1.0 + t) + 0.5 * xf * (1.0 - t * t) * _SQRT_2_OVER_PI * (1.0 + 3.0 * _GELU_C * xf * xf)
    else:
        grad = 0.5 * (1.0 + torch.erf(xf * _INV_SQRT_2)) + xf * torch.exp(-0.5 * xf * xf) * _INV_SQRT_2PI
    return (dyf * grad).to(x.dtype)


# ---------------------------------------------------------------- validation and dispatch


def _check_same(names, tensors):
    ref = tensors[0]
    if not ref.is_floating_point():
        raise ValueError(f"{names[0]} must be floating point, got {ref.dtype}")
    for name, t in zip(names[1:], tensors[1:]):
        if t.shape != ref.shape or t.dtype != ref.dtype or t.device != ref.device:
            raise ValueError(f"{name} ({t.dtype} {tuple(t.shape)} on {t.device}) must match {names[0]} "
                             f"({ref.dtype} {tuple(ref.shape)} on {ref.device})")


def _check_out(name, t, ref):
    if t.shape != ref.shape or t.dtype != ref.dtype or t.device != ref.device or not t.is_contiguous():
        raise ValueError(f"{name} must be a contiguous {ref.dtype} tensor of shape {tuple(ref.shape)} on "
                         f"{ref.device}, got {t.dtype} {tuple(t.shape)} on {t.device}")


def _check_approximate(approximate):
    if approximate not in APPROXIMATIONS:
        raise ValueError(f"approximate must be one of {APPROXIMATIONS}, got {approximate!r}")


def _empty(ref, out):
    return torch.empty(ref.shape, dtype=ref.dtype, device=ref.device) if out is None else out


# ---------------------------------------------------------------- public functions


def swiglu_forward(gate, up, *, out=None, backend="auto", validate=True):
    """y = silu(gate) * up, elementwise, in gate's dtype."""
    if validate:
        _check_same(("gate", "up"), (gate, up))
        if out is not None:
            _check_out("out", out, gate)
    if _ext.use_kernel(backend, "swiglu_forward", gate, up):
        y = _empty(gate, out)
        _ext.load().swiglu_fwd(gate.contiguous(), up.contiguous(), y)
        return y
    y = swiglu_forward_reference(gate, up)
    return y if out is None else out.copy_(y)


def swiglu_backward(dy, gate, up, *, out=None, backend="auto", validate=True):
    """(d_gate, d_up) for y = silu(gate) * up. `out=(d_gate, d_up)` reuses buffers."""
    if validate:
        _check_same(("gate", "up", "dy"), (gate, up, dy))
        if out is not None:
            _check_out("out[0] (d_gate)", out[0], gate)
            _check_out("out[1] (d_up)", out[1], gate)
    if _ext.use_kernel(backend, "swiglu_backward", dy, gate, up):
        d_gate, d_up = (_empty(gate, None), _empty(gate, None)) if out is None else out
        _ext.load().swiglu_bwd(dy.contiguous(), gate.contiguous(), up.contiguous(), d_gate, d_up)
        return d_gate, d_up
    d_gate, d_up = swiglu_backward_reference(dy, gate, up)
    return (d_gate, d_up) if out is None else (out[0].copy_(d_gate), out[1].copy_(d_up))


def gelu_forward(x, approximate, *, out=None, backend="auto", validate=True):
    """GELU: approximate "tanh" (GPT-2's gelu_new) or "none" (exact erf form, GPT-NeoX)."""
    if validate:
        _check_approximate(approximate)
        _check_same(("x",), (x,))
        if out is not None:
            _check_out("out", out, x)
    if _ext.use_kernel(backend, "gelu_forward", x):
        y = _empty(x, out)
        _ext.load().gelu_fwd(x.contiguous(), approximate == "tanh", y)
        return y
    y = gelu_forward_reference(x, approximate)
    return y if out is None else out.copy_(y)


def gelu_backward(dy, x, approximate, *, out=None, backend="auto", validate=True):
    """dx = dy * gelu'(x)."""
    if validate:
        _check_approximate(approximate)
        _check_same(("x", "dy"), (x, dy))
        if out is not None:
            _check_out("out", out, x)
    if _ext.use_kernel(backend, "gelu_backward", dy, x):
        dx = _empty(x, out)
        _ext.load().gelu_bwd(dy.contiguous(), x.contiguous(), approximate == "tanh", dx)
        return dx
    dx = gelu_backward_reference(dy, x, approximate)
    return dx if out is None else out.copy_(dx)
