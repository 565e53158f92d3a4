"""The MLP activations as ops differentiable twice, their double backward written out (derivation:
activation_double_backward.md).

    y = activation_op(kind, *pre, backend="auto")
    d_pre = activation_backward_op(kind, dy, *pre, backend="auto")

kind is one of ACTIVATIONS: "swiglu" (silu(gate) * up), "gelu_tanh", "gelu" (the exact erf form) and
"geglu_tanh" (gelu_tanh(gate) * up), the engine's names. The gated kinds take pre = (gate, up) and their
backward returns (d_gate, d_up); the others take one tensor x and return dx. The values are those of
activation.py's and geglu.py's public functions (swiglu_forward / gelu_forward / geglu_forward and their
backwards) with the same backend: their twins' values (float32 math, float64 for float64 inputs, results in
the input dtype) wherever the twins run. `activation_op`'s backward is `activation_backward_op`; that op's own
backward is the written double backward, `activation_double_backward`: a Triton kernel
(kernels/activation_double_backward.py) or its twin `activation_double_backward_reference`, plain torch ops.
Under create_graph (a third derivative) it is always the twin, which autograd differentiates once more. Each
autograd node saves only the op's tensor inputs: f, f' and f'' are recomputed from them.

backend, the policy of gradmem_fast.backends for every value the ops compute: "auto" takes each kernel where
it can run, else the twin; "kernel" raises RuntimeError where one cannot run; "reference" takes the twins.
The first-order kernels of swiglu and the GELUs are CUDA C++ (CUDA tensors only: on the CPU "kernel" raises
for them), geglu's and the double backward's are Triton (CUDA tensors, or CPU tensors under
TRITON_INTERPRET=1; float32, float16, bfloat16, no bfloat16 under the interpreter: `kernel_reason`).
"""
import torch

from .._triton import elementwise_reason
from ..backends import check_op_backend, use_kernel
from .activation import (_GELU_C, _INV_SQRT_2, _INV_SQRT_2PI, _SQRT_2_OVER_PI, gelu_backward, gelu_forward,
                         swiglu_backward, swiglu_forward)
from .dtypes import acc_dtype
from .geglu import geglu_backward, geglu_forward

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


def _approximate(kind):
    return "tanh" if kind == "gelu_tanh" else "none"


def _as_pre(pre):
    return (pre,) if isinstance(pre, torch.Tensor) else tuple(pre)


def _as_bars(grads_bar):
    return (grads_bar,) if grads_bar is None or isinstance(grads_bar, torch.Tensor) else tuple(grads_bar)


def _forward(kind, pre, backend):
    """y by activation.py's / geglu.py's public forward with `backend` (arguments checked already)."""
    if kind == "swiglu":
        return swiglu_forward(*pre, backend=backend, validate=False)
    if kind == "geglu_tanh":
        return geglu_forward(*pre, backend=backend, validate=False)
    return gelu_forward(*pre, _approximate(kind), backend=backend, validate=False)


def _backward(kind, dy, pre, backend):
    """(d_gate, d_up) or dx by activation.py's / geglu.py's public backward with `backend`."""
    if kind == "swiglu":
        return swiglu_backward(dy, *pre, backend=backend, validate=False)
    if kind == "geglu_tanh":
        return geglu_backward(dy, *pre, backend=backend, validate=False)
    return gelu_backward(dy, *pre, _approximate(kind), backend=backend, validate=False)


def activation_forward_reference(kind, *pre):
    """y in the first pre tensor's dtype: the forward twin of activation.py / geglu.py for kind."""
    return _forward(kind, pre, "reference")


def activation_backward_reference(kind, dy, *pre):
    """(d_gate, d_up) for the gated kinds, dx for the others: the backward twin of activation.py / geglu.py."""
    return _backward(kind, dy, pre, "reference")


def activation_double_backward_reference(kind, dy, pre, grads_bar):
    """(dy_bar, *pre_bar): the cotangents of dy and of each pre tensor of <grads_bar, activation_backward(dy,
    *pre)>. pre and grads_bar are tuples like the backward's inputs and outputs (or one tensor for the ungated
    kinds); a None in grads_bar is a zero cotangent. Computed in float32 (float64 for float64 inputs), each
    result in its input's dtype. The formulas are in activation_double_backward.md."""
    pre, grads_bar = _as_pre(pre), _as_bars(grads_bar)
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


# ---------------------------------------------------------------- dispatch


# None when the Triton kernel can take these tensors (dy, the pre tensors, the given cotangents), else why not
kernel_reason = elementwise_reason


# ---------------------------------------------------------------- autograd Functions


class _ActivationBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, kind, backend, dy, *pre):
        ctx.kind, ctx.backend = kind, backend
        ctx.set_materialize_grads(False)  # an unused output's cotangent stays None: a scalar zero, not a tensor
        ctx.save_for_backward(dy, *pre)
        return _backward(kind, dy, pre, backend)

    @staticmethod
    def backward(ctx, *grads_bar):
        dy, *pre = ctx.saved_tensors
        # autograd hands each cotangent in its output's dtype (the pre tensors'); None stays a zero
        grads_bar = tuple(None if g is None else g.to(t.dtype) for g, t in zip(grads_bar, pre))
        if torch.is_grad_enabled():  # create_graph: the double backward must itself be differentiable
            bars = activation_double_backward_reference(ctx.kind, dy, pre, grads_bar)
        else:
            bars = activation_double_backward(ctx.kind, dy, pre, grads_bar, backend=ctx.backend, validate=False)
        return (None, None, *bars)


class _Activation(torch.autograd.Function):
    @staticmethod
    def forward(ctx, kind, backend, *pre):
        ctx.kind, ctx.backend = kind, backend
        ctx.save_for_backward(*pre)
        return _forward(kind, pre, backend)

    @staticmethod
    def backward(ctx, dy):
        grads = _ActivationBackward.apply(ctx.kind, ctx.backend, dy, *ctx.saved_tensors)
        return (None, None, *grads) if isinstance(grads, tuple) else (None, None, grads)


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


def activation_double_backward(kind, dy, pre, grads_bar, *, backend="auto", validate=True):
    """(dy_bar, *pre_bar) as activation_double_backward_reference (same arguments, same dtypes): the Triton
    kernel where it can run (kernel_reason), else the twin, as `backend` says. Not differentiable itself:
    under autograd use activation_backward_op, whose backward this is."""
    pre, grads_bar = _as_pre(pre), _as_bars(grads_bar)
    if validate:
        check_op_backend(backend)
        names = ("d_gate", "d_up") if kind in GATED else ("dx",)
        if kind in ACTIVATIONS and len(grads_bar) != len(names):
            raise ValueError(f"{kind!r} takes {len(names)} cotangent(s) in grads_bar ({', '.join(names)}), "
                             f"got {len(grads_bar)}")
        _check(kind, pre, (("dy", dy),) + tuple((f"grads_bar[{i}] (of {name})", g) for i, (name, g)
                                                in enumerate(zip(names, grads_bar)) if g is not None))
    given = tuple(g for g in grads_bar if g is not None)
    if use_kernel(backend, "activation_double_backward", kernel_reason(dy, *pre, *given), "Triton kernel"):
        from ..kernels.activation_double_backward import activation_double_backward as launch

        return launch(kind, dy, pre, grads_bar)
    return activation_double_backward_reference(kind, dy, pre, grads_bar)


def activation_op(kind, *pre, backend="auto", validate=True):
    """y by activation.py's / geglu.py's forward with `backend` (activation_forward_reference's values where
    the twins run); differentiable in every pre tensor, with backward activation_backward_op, itself
    differentiable."""
    if validate:
        check_op_backend(backend)
        _check(kind, pre)
    return _Activation.apply(kind, backend, *pre)


def activation_backward_op(kind, dy, *pre, backend="auto", validate=True):
    """(d_gate, d_up) for the gated kinds, dx for the others, by activation.py's / geglu.py's backward with
    `backend` (activation_backward_reference's values where the twins run); differentiable in dy and every pre
    tensor by the written double backward (activation_double_backward with `backend`; its twin under
    create_graph)."""
    if validate:
        check_op_backend(backend)
        _check(kind, pre, (("dy", dy),))
    return _ActivationBackward.apply(kind, backend, dy, *pre)


__all__ = ["ACTIVATIONS", "GATED", "activation_backward_op", "activation_backward_reference",
           "activation_double_backward", "activation_double_backward_reference", "activation_forward_reference",
           "activation_op", "kernel_reason"]
