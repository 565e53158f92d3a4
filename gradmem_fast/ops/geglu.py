"""GeGLU with the tanh GELU (Gemma's MLP): y = gelu_tanh(gate) * up, forward and input-gradient backward.

Elementwise; gate, up (..., I) of one dtype. The backward recomputes the GELU from gate: nothing beyond the
inputs is saved. Derivation: geglu.md.
"""
import torch

from .._triton import elementwise_reason
from ..backends import use_kernel
from .activation import _check_out, _check_same, gelu_backward_reference, gelu_forward_reference
from .dtypes import acc_dtype



# ---------------------------------------------------------------- pure-PyTorch twins


def geglu_forward_reference(gate, up):
    """gelu_tanh(gate) * up computed in float32 (float64 for float64 inputs), in gate's dtype."""
    acc = acc_dtype(gate.dtype)
    return (gelu_forward_reference(gate.to(acc), "tanh") * up.to(acc)).to(gate.dtype)


def geglu_backward_reference(dy, gate, up):
    """d_gate = dy * up * gelu_tanh'(gate), d_up = dy * gelu_tanh(gate)."""
    acc = acc_dtype(gate.dtype)
    g, u, dyf = gate.to(acc), up.to(acc), dy.to(acc)
    d_gate = gelu_backward_reference(dyf * u, g, "tanh")
    d_up = dyf * gelu_forward_reference(g, "tanh")
    return d_gate.to(gate.dtype), d_up.to(up.dtype)


# ---------------------------------------------------------------- dispatch


kernel_reason = elementwise_reason


def _empty(ref):
    return torch.empty(ref.shape, dtype=ref.dtype, device=ref.device)


def geglu_forward(gate, up, *, out=None, backend="auto", validate=True):
    """y = gelu_tanh(gate) * up, elementwise, in gate's dtype."""
    if validate:
        _check_same(("gate", "up"), (gate, up))
        if out is not None:
            _check_out("out", out, gate)
    if use_kernel(backend, "geglu_forward", kernel_reason(gate, up), "Triton kernel"):
        from ..kernels.geglu import geglu_fwd

        y = _empty(gate) if out is None else out
        geglu_fwd(gate.contiguous(), up.contiguous(), y)
        return y
    y = geglu_forward_reference(gate, up)
    return y if out is None else out.copy_(y)


def geglu_backward(dy, gate, up, *, out=None, backend="auto", validate=True):
    """(d_gate, d_up) for y = gelu_tanh(gate) * up. `out=(d_gate, d_up)` reuses buffers."""
    if validate:
        _check_same(("gate", "up", "dy"), (gate, up, dy))
        if out is not None:
            _check_out("out[0] (d_gate)", out[0], gate)
            _check_out("out[1] (d_up)", out[1], gate)
    if use_kernel(backend, "geglu_backward", kernel_reason(dy, gate, up), "Triton kernel"):
        from ..kernels.geglu import geglu_bwd

        d_gate, d_up = (_empty(gate), _empty(gate)) if out is None else out
        geglu_bwd(dy.contiguous(), gate.contiguous(), up.contiguous(), d_gate, d_up)
        return d_gate, d_up
    d_gate, d_up = geglu_backward_reference(dy, gate, up)
    return (d_gate, d_up) if out is None else (out[0].copy_(d_gate), out[1].copy_(d_up))
