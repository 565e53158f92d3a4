"""GeGLU with the tanh GELU (Gemma), forward and input-gradient backward, elementwise over contiguous
tensors. tanh is formed from exp (libdevice is unavailable under the interpreter). Derivation:
gradmem_fast/ops/geglu.md."""
import triton
import triton.language as tl

SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)
GELU_C = tl.constexpr(0.044715)
BLOCK = 1024


@triton.jit
def _tanh(x):
    # tanh(x) = sign(x) (1 - e) / (1 + e), e = exp(-2|x|) in (0, 1]: no overflow, exact limits +-1
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def _geglu_fwd_kernel(p_gate, p_up, p_y, n, BLOCK: tl.constexpr):
    o = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = o < n
    b_g = tl.load(p_gate + o, mask=m, other=0.0).to(tl.float32)
    b_u = tl.load(p_up + o, mask=m, other=0.0).to(tl.float32)
    b_t = _tanh((b_g + b_g * b_g * b_g * GELU_C) * SQRT_2_OVER_PI)
    tl.store(p_y + o, (0.5 * b_g * (1.0 + b_t) * b_u).to(p_y.dtype.element_ty), mask=m)


@triton.jit
def _geglu_bwd_kernel(p_dy, p_gate, p_up, p_dgate, p_dup, n, BLOCK: tl.constexpr):
    o = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = o < n
    b_dy = tl.load(p_dy + o, mask=m, other=0.0).to(tl.float32)
    b_g = tl.load(p_gate + o, mask=m, other=0.0).to(tl.float32)
    b_u = tl.load(p_up + o, mask=m, other=0.0).to(tl.float32)
    b_t = _tanh((b_g + b_g * b_g * b_g * GELU_C) * SQRT_2_OVER_PI)
    b_gelu = 0.5 * b_g * (1.0 + b_t)
    b_dgelu = 0.5 * (1.0 + b_t) + 0.5 * b_g * (1.0 - b_t * b_t) * SQRT_2_OVER_PI * (1.0 + b_g * b_g * GELU_C * 3.0)
    tl.store(p_dgate + o, (b_dy * b_u * b_dgelu).to(p_dgate.dtype.element_ty), mask=m)
    tl.store(p_dup + o, (b_dy * b_gelu).to(p_dup.dtype.element_ty), mask=m)


def geglu_fwd(gate, up, y):
    """gate, up, y contiguous, same shape and dtype."""
    n = gate.numel()
    _geglu_fwd_kernel[(triton.cdiv(n, BLOCK),)](gate, up, y, n, BLOCK=BLOCK)


def geglu_bwd(dy, gate, up, d_gate, d_up):
    n = gate.numel()
    _geglu_bwd_kernel[(triton.cdiv(n, BLOCK),)](dy, gate, up, d_gate, d_up, n, BLOCK=BLOCK)
