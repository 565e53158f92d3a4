"""The MLP activations' double backward, one elementwise kernel over contiguous tensors: from dy, the pre
tensors and the cotangents of the backward's outputs, the cotangents of dy and of each pre tensor (formulas:
gradmem_fast/ops/activation_double_backward.md). f, f' and f'' are recomputed from the pre tensors in float32
registers; each result is stored in its output's dtype. tanh and sech^2 are formed from one exp (libdevice
is unavailable under the interpreter); the exact GELU uses tl.math.erf."""
import torch
import triton
import triton.language as tl

from .geglu import GELU_C, SQRT_2_OVER_PI

INV_SQRT_2 = tl.constexpr(0.7071067811865476)
INV_SQRT_2PI = tl.constexpr(0.3989422804014327)
BLOCK = 1024

# the KIND constexpr of each activation; the gated ones (y = f(gate) * up) come first
KINDS = {"swiglu": 0, "geglu_tanh": 1, "gelu_tanh": 2, "gelu": 3}
GATED_KINDS = tl.constexpr(2)  # KIND < GATED_KINDS: gated


@triton.jit
def _silu(b_x):
    # (f, f', f'') of x s, s = sigmoid(x)
    b_s = 1.0 / (1.0 + tl.exp(-b_x))
    b_ds = b_s * (1.0 - b_s)
    return b_x * b_s, b_s + b_x * b_ds, b_ds * (2.0 + b_x * (1.0 - 2.0 * b_s))


@triton.jit
def _gelu_tanh(b_x):
    # (f, f', f'') of 0.5 x (1 + tanh(u)), u = sqrt(2/pi) (x + c x^3). With e = exp(-2|u|) in (0, 1]:
    # tanh(u) = sign(u) (1 - e) / (1 + e) and sech^2(u) = 4 sigmoid(2u) sigmoid(-2u) = 4 e / (1 + e)^2,
    # neither overflowing nor cancelling where tanh(u) rounds to +-1
    b_x2 = b_x * b_x
    b_u = SQRT_2_OVER_PI * (b_x + GELU_C * b_x2 * b_x)
    b_du = SQRT_2_OVER_PI * (1.0 + 3.0 * GELU_C * b_x2)
    b_e = tl.exp(-2.0 * tl.abs(b_u))
    b_r = 1.0 / (1.0 + b_e)
    b_t = (1.0 - b_e) * b_r
    b_t = tl.where(b_u < 0, -b_t, b_t)
    b_sech2 = 4.0 * b_e * b_r * b_r
    b_d2 = b_sech2 * (b_du + 3.0 * SQRT_2_OVER_PI * GELU_C * b_x2 - b_x * b_t * b_du * b_du)
    return 0.5 * b_x * (1.0 + b_t), 0.5 * (1.0 + b_t) + 0.5 * b_x * b_sech2 * b_du, b_d2


@triton.jit
def _gelu_erf(b_x):
    # (f, f', f'') of x Phi(x): Phi + x phi and phi (2 - x^2), phi the standard normal density
    b_phi = tl.exp(-0.5 * b_x * b_x) * INV_SQRT_2PI
    b_cdf = 0.5 * (1.0 + tl.math.erf(b_x * INV_SQRT_2))
    return b_x * b_cdf, b_cdf + b_x * b_phi, b_phi * (2.0 - b_x * b_x)


@triton.jit
def _activation_double_backward_kernel(p_dy, p_g, p_u, p_a, p_b, p_dy_bar, p_g_bar, p_u_bar, n,
                                       KIND: tl.constexpr, HAS_A: tl.constexpr, HAS_B: tl.constexpr,
                                       BLOCK: tl.constexpr):
    """g: the gate (gated kinds) or x; u, b and u_bar only for the gated kinds. a: the cotangent of d_gate
    (or dx), b that of d_up; HAS_A / HAS_B off: a zero cotangent, its pointer never read."""
    i_b = tl.program_id(0).to(tl.int64)
    o = i_b * BLOCK + tl.arange(0, BLOCK)
    m = o < n
    b_dy = tl.load(p_dy + o, mask=m, other=0.0).to(tl.float32)
    b_g = tl.load(p_g + o, mask=m, other=0.0).to(tl.float32)
    if KIND == 0:
        b_f, b_f1, b_f2 = _silu(b_g)
    elif KIND == 3:
        b_f, b_f1, b_f2 = _gelu_erf(b_g)
    else:
        b_f, b_f1, b_f2 = _gelu_tanh(b_g)
    b_zero = tl.zeros([BLOCK], dtype=tl.float32)
    if KIND < GATED_KINDS:  # gated: d_gate = dy u f'(g), d_up = dy f(g)
        b_u = tl.load(p_u + o, mask=m, other=0.0).to(tl.float32)
        if HAS_A:
            b_a = tl.load(p_a + o, mask=m, other=0.0).to(tl.float32)
            b_au = b_a * b_u
            if HAS_B:
                b_b = tl.load(p_b + o, mask=m, other=0.0).to(tl.float32)
                b_dy_bar = b_au * b_f1 + b_b * b_f
                b_g_bar = b_dy * (b_au * b_f2 + b_b * b_f1)
            else:
                b_dy_bar = b_au * b_f1
                b_g_bar = b_dy * (b_au * b_f2)
            b_u_bar = b_a * b_dy * b_f1
        else:
            if HAS_B:
                b_b = tl.load(p_b + o, mask=m, other=0.0).to(tl.float32)
                b_dy_bar = b_b * b_f
                b_g_bar = b_dy * (b_b * b_f1)
            else:
                b_dy_bar = b_zero
                b_g_bar = b_zero
            b_u_bar = b_zero
        tl.store(p_u_bar + o, b_u_bar.to(p_u_bar.dtype.element_ty), mask=m)
    else:  # dx = dy f'(x)
        if HAS_A:
            b_a = tl.load(p_a + o, mask=m, other=0.0).to(tl.float32)
            b_dy_bar = b_a * b_f1
            b_g_bar = b_a * b_dy * b_f2
        else:
            b_dy_bar = b_zero
            b_g_bar = b_zero
    tl.store(p_dy_bar + o, b_dy_bar.to(p_dy_bar.dtype.element_ty), mask=m)
    tl.store(p_g_bar + o, b_g_bar.to(p_g_bar.dtype.element_ty), mask=m)


def _empty(ref):
    return torch.empty(ref.shape, dtype=ref.dtype, device=ref.device)


def activation_double_backward(kind, dy, pre, grads_bar):
    """(dy_bar, *pre_bar) as ops.activation_double_backward_reference: pre is (gate, up) for the gated kinds,
    (x,) or x for the others; grads_bar the cotangents of the backward's outputs in the same form, a None a
    zero cotangent. Every tensor of one shape (and, for the results' dtypes, of one dtype per role); inputs
    are made contiguous, the outputs allocated here (contiguous, in dy's and the pre tensors' dtypes)."""
    pre = (pre,) if isinstance(pre, torch.Tensor) else tuple(pre)
    grads_bar = (grads_bar,) if grads_bar is None or isinstance(grads_bar, torch.Tensor) else tuple(grads_bar)
    code = KINDS[kind]
    gated = code < GATED_KINDS.value
    if len(pre) != (2 if gated else 1) or len(grads_bar) != len(pre):
        raise ValueError(f"{kind!r} takes {2 if gated else 1} pre tensor(s) and as many cotangents, got "
                         f"{len(pre)} and {len(grads_bar)}")
    dy = dy.contiguous()
    pre = tuple(t.contiguous() for t in pre)
    a = None if grads_bar[0] is None else grads_bar[0].contiguous()
    b = None if not gated or grads_bar[1] is None else grads_bar[1].contiguous()
    outs = (_empty(dy), *(_empty(t) for t in pre))
    n = dy.numel()
    if n:
        g, u = pre[0], pre[-1]  # u: a placeholder for the ungated kinds, never read
        _activation_double_backward_kernel[(triton.cdiv(n, BLOCK),)](
            dy, g, u, dy if a is None else a, dy if b is None else b, outs[0], outs[1], outs[-1], n,
            KIND=code, HAS_A=a is not None, HAS_B=b is not None, BLOCK=BLOCK)
    return outs
