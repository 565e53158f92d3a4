"""The MLP activations as ops differentiable twice, their double backward written out (derivation:
activation_double_backward.md).

    y = activation_op(kind, *pre)
    d_pre = activation_backward_op(kind, dy, *pre)

kind is one of ACTIVATIONS: "swiglu" (silu(gate) * up), "gelu_tanh", "gelu" (the exact erf form) and
"geglu_tanh" (gelu_tanh(gate) * up), the engine's names. The gated kinds take pre = (gate, up) and their
backward returns (d_gate, d_up); the others take one tensor x and return dx. The values are those of the twins
in activation.py and geglu.py (float32 math, float64 for float64 inputs, results in the input dtype).
`activation_op`'s backward is `activation_backward_op`; that op's own backward is the written double backward
(`activation_double_backward_reference`), plain torch ops, which autograd can differentiate once more (a third
derivative). Each autograd node saves only the op's tensor inputs: f, f' and f'' are recomputed from them.
"""
import torch

from .activation import (_GELU_C, _INV_SQRT_2, _INV_SQRT_2PI, _SQRT_2_OVER_PI, gelu_backward_reference,
                         gelu_forward_reference, swiglu_backward_reference, swiglu_forward_reference)
from .dtypes import acc_dtype
from .geglu import geglu_backward_reference, geglu_forward_reference

ACTIVATIONS = ("swiglu", "gelu_tanh", "gelu", "geglu_tanh")
GATED = ("swiglu", "geglu_tanh")


# ---------------------------------------------------------------- f, f' and f'' of each activation


def _silu(g):
    """(f, f', f'') of silu(g) = g s, s = sigmoid(g)."""
    s = torch.sigmoid(g)
    ds = s * (1.0 - s)
    return g * s, s + g * ds, ds * (2.0 + g * (1.0 - 2.0 * s))


def _gelu_tanh(x):
    """(f, f', f'') of 0.5 x (1 + tanh(u)), u = sqrt(2/pi) (x + 0.044715 x^3). 1 - tanh(u)^2 is evaluated as
    4 sigmoid(2u) sigmoid(-2u): accurate where tanh(u) has rounded to +-1 and 1 - t^2 would be rounding noise
    (times x u'^2 in f''), and smooth, so autograd differentiates it again."""
    u = _SQRT_2_OVER_PI * (x + _GELU_C * x ** 3)
    du = _SQRT_2_OVER_PI * (1.0 + 3.0 * _GELU_C * x * x)
    t = torch.tanh(u)
    sech2 = 4.0 * torch.sigmoid(2.0 * u) * torch.sigmoid(-2.0 * u)
    d2 = sech2 * (du + 3.0 * _SQRT_2_OVER_PI * _GELU_C * x * x - x * t * du * du)
    return 0.5 * x * (1.0 + t), 0.5 * (1.0 + t) + 0.5 * x * sech2 * du, d2


def _gelu_erf(x):
    """(f, f', f'') of x Phi(x): Phi + x phi and phi (2 - x^2), phi the standard normal density."""
    phi = torch.exp(-0.5 * x * x) * _INV_SQRT_2PI
    cdf = 0.5 * (1.0 + torch.erf(x * _INV_SQRT_2))
    return x * cdf, cdf + x * phi, phi * (2.0 - x * x)


_DERIVATIVES = {"swiglu": _silu, "geglu_tanh": _gelu_tanh, "gelu_tanh": _gelu_tanh, "gelu": _gelu_erf}


# ---------------------------------------------------------------- pure-PyTorch twins


def activation_forward_reference(kind, *pre):
    """y in the first pre tensor's dtype: the forward twin of activation.py / geglu.py for kind."""
    if kind == "swiglu":
        return swiglu_forward_reference(*pre)
    if kind == "geglu_tanh":
        return geglu_forward_reference(*pre)
    return gelu_forward_reference(*pre, "tanh" if kind == "gelu_tanh" else "none")


def activation_backward_reference(kind, dy, *pre):
    """(d_gate, d_up) for the gated kinds, dx for the others: the backward twin of activation.py / geglu.py."""
    if kind == "swiglu":
        return swiglu_backward_reference(dy, *pre)
    if kind == "geglu_tanh":
        return geglu_backward_reference(dy, *pre)
    return gelu_backward_reference(dy, *pre, "tanh" if kind == "gelu_tanh" else "none")


def activation_double_backward_reference(kind, dy, pre, grads_bar):
    """(dy_bar, *pre_bar): the cotangents of dy and of each pre tensor of <grads_bar, activation_backward(dy,
    *pre)>. pre and grads_bar are tuples like the backward's inputs and outputs (or one tensor for the ungated
    kinds); a None in grads_bar is a zero cotangent. Computed in float32 (float64 for float64 inputs), each
    result in its input's dtype. The formulas are in activation_double_backward.md."""
    pre = (pre,) if isinstance(pre, torch.Tensor) else tuple(pre)
    grads_bar = (grads_bar,) if grads_bar is None or isinstance(grads_bar, torch.Tensor) else tuple(grads_bar)
    acc = acc_dtype(pre[0].dtype)
    zero = torch.zeros((), dtype=acc, device=pre[0].device)
    a, *rest = (zero if g is None else g.to(acc) for g in grads_bar)  # a: cotangent of d_gate (or dx)
    dyf, g = dy.to(acc), pre[0].to(acc)
    f, f1, f2 = _DERIVATIVES[kind](g)
    if kind not in GATED:  # dx = dy f'(x)
        return (a * f1).to(dy.dtype), (a * dyf * f2).to(pre[0].dtype)
    b, u = rest[0], pre[1].to(acc)  # d_gate = dy u f'(g), d_up = dy f(g); b: cotangent of d_up
    dy_bar = a * u * f1 + b * f
    g_bar = dyf * (a * u * f2 + b * f1)
    u_bar = a * dyf * f1
    return dy_bar.to(dy.dtype), g_bar.to(pre[0].dtype), u_bar.to(pre[1].dtype)


# ---------------------------------------------------------------- autograd Functions


class _ActivationBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, kind, dy, *pre):
        ctx.kind = kind
        ctx.set_materialize_grads(False)  # an unused output's cotangent stays None: a scalar zero, not a tensor
        ctx.save_for_backward(dy, *pre)
        return activation_backward_reference(kind, dy, *pre)

    @staticmethod
    def backward(ctx, *grads_bar):
        dy, *pre = ctx.saved_tensors
        return (None, *activation_double_backward_reference(ctx.kind, dy, pre, grads_bar))


class _Activation(torch.autograd.Function):
    @staticmethod
    def forward(ctx, kind, *pre):
        ctx.kind = kind
        ctx.save_for_backward(*pre)
        return activation_forward_reference(kind, *pre)

    @staticmethod
    def backward(ctx, dy):
        grads = _ActivationBackward.apply(ctx.kind, dy, *ctx.saved_tensors)
        return (None, *grads) if isinstance(grads, tuple) else (None, grads)


# ---------------------------------------------------------------- validation


def _check(kind, pre, others=()):
    if kind not in ACTIVATIONS:
        raise ValueError(f"kind must be one of {ACTIVATIONS}, got {kind!r}")
    names = ("gate", "up") if kind in GATED else ("x",)
    if len(pre) != len(names):
        raise ValueError(f"{kind!r} takes {len(names)} pre-activation tensor(s) ({', '.join(names)}), "
                         f"got {len(pre)}")
    named = list(zip(names, pre)) + list(others)
    for name, t in named:
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise ValueError(f"{name} must be a floating tensor, got {getattr(t, 'dtype', type(t).__name__)}")
    ref_name, ref = named[0]
    for name, t in named[1:]:
        if t.shape != ref.shape or t.dtype != ref.dtype or t.device != ref.device:
            raise ValueError(f"{name} ({t.dtype} {tuple(t.shape)} on {t.device}) must match {ref_name} "
                             f"({ref.dtype} {tuple(ref.shape)} on {ref.device})")


# ---------------------------------------------------------------- public functions


def activation_op(kind, *pre, validate=True):
    """y = activation_forward_reference(kind, *pre); differentiable in every pre tensor, with backward
    activation_backward_op, itself differentiable."""
    if validate:
        _check(kind, pre)
    return _Activation.apply(kind, *pre)


def activation_backward_op(kind, dy, *pre, validate=True):
    """(d_gate, d_up) for the gated kinds, dx for the others, as activation_backward_reference; differentiable
    in dy and every pre tensor by the written double backward."""
    if validate:
        _check(kind, pre, (("dy", dy),))
    return _ActivationBackward.apply(kind, dy, *pre)


__all__ = ["ACTIVATIONS", "GATED", "activation_backward_op", "activation_backward_reference",
           "activation_double_backward_reference", "activation_forward_reference", "activation_op"]
