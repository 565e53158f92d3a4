"""Grouped RMS norm over the last dim (the q/k norm of Qwen3, OLMo 2, Gemma 3), forward and input-gradient
backward. Rows are (n, g) pairs of x viewed as (N, G, D) with D contiguous; row (n, g) uses weight[g].
Derivation: gradmem_fast/ops/qk_norm.md."""
import triton
import triton.language as tl


@triton.jit
def _qk_norm_fwd_kernel(p_x, p_w, p_y, p_rstd, n_rows, G, D, stride_xn, stride_xg, stride_yn, stride_yg, eps,
                        BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    i_r = tl.program_id(0)
    o_r = (i_r * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    o_d = tl.arange(0, BLOCK_D)
    row_ok = o_r < n_rows
    o_n, o_g = o_r // G, o_r % G
    m_rd = row_ok[:, None] & (o_d[None, :] < D)
    b_x = tl.load(p_x + o_n[:, None] * stride_xn + o_g[:, None] * stride_xg + o_d[None, :], mask=m_rd,
                  other=0.0).to(tl.float32)
    b_w = tl.load(p_w + o_g[:, None] * D + o_d[None, :], mask=m_rd, other=0.0).to(tl.float32)
    b_rstd = 1.0 / tl.sqrt(tl.sum(b_x * b_x, axis=1) / D + eps)
    b_y = b_x * b_rstd[:, None] * b_w
    tl.store(p_y + o_n[:, None] * stride_yn + o_g[:, None] * stride_yg + o_d[None, :],
             b_y.to(p_y.dtype.element_ty), mask=m_rd)
    tl.store(p_rstd + o_r, b_rstd, mask=row_ok)


@triton.jit
def _qk_norm_bwd_kernel(p_dy, p_x, p_w, p_rstd, p_dx, n_rows, G, D, stride_dyn, stride_dyg, stride_xn, stride_xg,
                        stride_dxn, stride_dxg, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    i_r = tl.program_id(0)
    o_r = (i_r * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    o_d = tl.arange(0, BLOCK_D)
    row_ok = o_r < n_rows
    o_n, o_g = o_r // G, o_r % G
    m_rd = row_ok[:, None] & (o_d[None, :] < D)
    b_dy = tl.load(p_dy + o_n[:, None] * stride_dyn + o_g[:, None] * stride_dyg + o_d[None, :], mask=m_rd,
                   other=0.0).to(tl.float32)
    b_x = tl.load(p_x + o_n[:, None] * stride_xn + o_g[:, None] * stride_xg + o_d[None, :], mask=m_rd,
                  other=0.0).to(tl.float32)
    b_w = tl.load(p_w + o_g[:, None] * D + o_d[None, :], mask=m_rd, other=0.0).to(tl.float32)
    b_rstd = tl.load(p_rstd + o_r, mask=row_ok, other=0.0)
    b_xhat = b_x * b_rstd[:, None]
    b_g = b_dy * b_w
    b_c = tl.sum(b_g * b_xhat, axis=1) / D
    b_dx = b_rstd[:, None] * (b_g - b_xhat * b_c[:, None])
    tl.store(p_dx + o_n[:, None] * stride_dxn + o_g[:, None] * stride_dxg + o_d[None, :],
             b_dx.to(p_dx.dtype.element_ty), mask=m_rd)


def _blocks(D):
    block_d = triton.next_power_of_2(D)
    return max(1, min(16, 4096 // block_d)), block_d


def qk_norm_fwd(x3, weight, eps, y3, rstd):
    """x3, y3 (N, G, D) with D contiguous; weight (G, D) contiguous; rstd (N * G,) float32 contiguous."""
    N, G, D = x3.shape
    block_r, block_d = _blocks(D)
    grid = (triton.cdiv(N * G, block_r),)
    _qk_norm_fwd_kernel[grid](x3, weight, y3, rstd, N * G, G, D, x3.stride(0), x3.stride(1), y3.stride(0),
                              y3.stride(1), float(eps), BLOCK_R=block_r, BLOCK_D=block_d)


def qk_norm_bwd(dy3, x3, weight, rstd, dx3):
    """dy3, x3, dx3 (N, G, D) with D contiguous; weight (G, D) contiguous; rstd (N * G,) float32."""
    N, G, D = x3.shape
    block_r, block_d = _blocks(D)
    grid = (triton.cdiv(N * G, block_r),)
    _qk_norm_bwd_kernel[grid](dy3, x3, weight, rstd, dx3, N * G, G, D, dy3.stride(0), dy3.stride(1), x3.stride(0),
                              x3.stride(1), dx3.stride(0), dx3.stride(1), BLOCK_R=block_r, BLOCK_D=block_d)
