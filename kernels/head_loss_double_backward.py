"""Triton kernels and host launcher for the backward of the differentiable head + cross-entropy op (see
gradmem_fast/ops/head_loss_double_backward.md).

Two kernels; logits exist only tile by tile, recomputed from hidden, weight and the saved lse:
- `_dhidden_kernel`: one program per BLOCK_N rows. u_t = grad_bar . W_t, then pass 1 over the vocabulary
  for the row sums s = sum_{v != t} p_v and c = sum_{v != t} p_v (u_v - u_t) (written out with u_t, 3
  floats per row), then pass 2 forms delta = dJ/dz tile by tile and accumulates hidden_bar = delta W.
- `_dweight_kernel`: one program per BLOCK_V vocabulary rows, run after the first: a loop over every row
  block forms delta and gamma (the direct weight term) from the row stats and accumulates
  weight_bar = delta^T H + gamma^T grad_bar for its rows.
Rows split the hidden gradient and vocabulary rows the weight gradient, so no atomics: deterministic.
"""
import torch
import triton
import triton.language as tl

from gradmem_fast._triton import interpreter_on

from .device import on_device
from .head_loss import acc_rows_times_weight
from .precision import dot_precision


@triton.jit
def _logits_and_cotangent_tile(p_h, p_gb, p_w, o_n64, m_live, o_col64, m_col, D, stride_h, stride_gb, stride_w,
                               BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
                               PRECISION: tl.constexpr):
    # z = H W_tile^T and u = grad_bar W_tile^T, (BLOCK_N, BLOCK_V) fp32; rows not live read as zeros
    o_d = tl.arange(0, BLOCK_D)
    b_z = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
    b_u = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        m_dd = d0 + o_d < D
        m_nd = m_live[:, None] & m_dd[None, :]
        b_h = tl.load(p_h + o_n64[:, None] * stride_h + d0 + o_d[None, :], mask=m_nd, other=0.0)
        b_g = tl.load(p_gb + o_n64[:, None] * stride_gb + d0 + o_d[None, :], mask=m_nd, other=0.0)
        b_wt = tl.load(p_w + o_col64[None, :] * stride_w + d0 + o_d[:, None],
                       mask=m_col[None, :] & m_dd[:, None], other=0.0)  # (BLOCK_D, BLOCK_V)
        b_z = tl.dot(b_h, b_wt, b_z, input_precision=PRECISION)
        b_u = tl.dot(b_g, b_wt, b_u, input_precision=PRECISION)
    return b_z, b_u


@triton.jit
def _delta_gamma(b_z, b_u, b_is_t, b_valid, b_lse, b_ut, b_s, b_c, b_lb, b_rw):
    # delta = dJ/dz and gamma = w (p - onehot(t)), written around the target column (no p_t - 1, no u_t - u_bar)
    b_p = tl.where(b_valid, tl.exp(b_z - b_lse[:, None]), 0.0)
    b_du = b_u - b_ut[:, None] - b_c[:, None]
    b_delta = tl.where(b_is_t, -(b_lb * b_s)[:, None] - (b_rw * b_c)[:, None] * b_p,
                       b_p * (b_lb[:, None] + b_rw[:, None] * b_du))
    b_gamma = tl.where(b_is_t, -(b_rw * b_s)[:, None], b_rw[:, None] * b_p)
    return tl.where(b_valid, b_delta, 0.0), tl.where(b_valid, b_gamma, 0.0)


@triton.jit
def _dhidden_kernel(p_h, p_w, p_targets, p_row_weights, p_lse, p_loss_bar, p_grad_bar, p_stats, p_acc, p_hbar,
                    N, V, D, stride_h, stride_w, stride_gb, stride_hb,
                    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
                    NEED_HIDDEN: tl.constexpr, ACC_IS_OUT: tl.constexpr):
    # p_stats (3, N) fp32: u_t, s, c per row; p_acc (N, D) fp32 holds hidden_bar while it accumulates
    i_n = tl.program_id(0)
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_n = o_n < N
    o_n64 = o_n.to(tl.int64)
    o_d = tl.arange(0, BLOCK_D)
    o_v = tl.arange(0, BLOCK_V)
    b_rw = tl.load(p_row_weights + o_n, mask=m_n, other=0.0)
    b_live = b_rw != 0
    b_t = tl.load(p_targets + o_n, mask=b_live, other=-1)
    # a clamp keeps the target pointers in range (the loads are masked by b_live)
    b_t64 = tl.minimum(tl.maximum(b_t, 0), V - 1).to(tl.int64)
    b_ut = tl.zeros([BLOCK_N], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        m_nd = b_live[:, None] & (d0 + o_d < D)[None, :]
        b_g = tl.load(p_grad_bar + o_n64[:, None] * stride_gb + d0 + o_d[None, :], mask=m_nd, other=0.0)
        b_wt = tl.load(p_w + b_t64[:, None] * stride_w + d0 + o_d[None, :], mask=m_nd, other=0.0)
        b_ut += tl.sum(b_g.to(tl.float32) * b_wt.to(tl.float32), axis=1)
    b_lse = tl.load(p_lse + o_n, mask=b_live, other=0.0)
    b_s = tl.zeros([BLOCK_N], dtype=tl.float32)
    b_c = tl.zeros([BLOCK_N], dtype=tl.float32)
    if tl.max(b_live.to(tl.int32), axis=0) > 0:  # a block of rows that all have weight 0 skips the passes
        for v0 in range(0, V, BLOCK_V):  # pass 1: the row sums
            o_col = v0 + o_v
            m_col = o_col < V
            b_z, b_u = _logits_and_cotangent_tile(p_h, p_grad_bar, p_w, o_n64, b_live, o_col.to(tl.int64), m_col, D,
                                                  stride_h, stride_gb, stride_w, BLOCK_N, BLOCK_V, BLOCK_D, PRECISION)
            b_keep = b_live[:, None] & m_col[None, :] & (o_col[None, :] != b_t[:, None])
            b_p = tl.where(b_keep, tl.exp(b_z - b_lse[:, None]), 0.0)
            b_s += tl.sum(b_p, axis=1)
            b_c += tl.sum(b_p * (b_u - b_ut[:, None]), axis=1)
    tl.store(p_stats + o_n64, b_ut, mask=m_n)
    tl.store(p_stats + N + o_n64, b_s, mask=m_n)
    tl.store(p_stats + 2 * N + o_n64, b_c, mask=m_n)
    if NEED_HIDDEN:
        b_lb = tl.load(p_loss_bar + o_n, mask=b_live, other=0.0)
        if tl.max(b_live.to(tl.int32), axis=0) == 0:
            for d0 in range(0, D, BLOCK_D):
                m_nd = m_n[:, None] & (d0 + o_d < D)[None, :]
                tl.store(p_hbar + o_n64[:, None] * stride_hb + d0 + o_d[None, :],
                         tl.zeros([BLOCK_N, BLOCK_D], dtype=p_hbar.dtype.element_ty), mask=m_nd)
        else:
            for v0 in range(0, V, BLOCK_V):  # pass 2: hidden_bar += delta W_tile
                o_col = v0 + o_v
                m_col = o_col < V
                o_col64 = o_col.to(tl.int64)
                b_z, b_u = _logits_and_cotangent_tile(p_h, p_grad_bar, p_w, o_n64, b_live, o_col64, m_col, D,
                                                      stride_h, stride_gb, stride_w, BLOCK_N, BLOCK_V, BLOCK_D,
                                                      PRECISION)
                b_valid = b_live[:, None] & m_col[None, :]
                b_delta, _ = _delta_gamma(b_z, b_u, o_col[None, :] == b_t[:, None], b_valid, b_lse, b_ut, b_s,
                                          b_c, b_lb, b_rw)
                acc_rows_times_weight(p_acc, p_w, b_delta.to(p_w.dtype.element_ty), b_lse, o_n64, m_n, o_col64,
                                      m_col, v0, D, stride_w, BLOCK_D, False, PRECISION)
            if not ACC_IS_OUT:
                for d0 in range(0, D, BLOCK_D):
                    m_nd = m_n[:, None] & (d0 + o_d < D)[None, :]
                    b_a = tl.load(p_acc + o_n64[:, None] * D + d0 + o_d[None, :], mask=m_nd, other=0.0)
                    tl.store(p_hbar + o_n64[:, None] * stride_hb + d0 + o_d[None, :],
                             b_a.to(p_hbar.dtype.element_ty), mask=m_nd)


@triton.jit
def _dweight_kernel(p_h, p_w, p_targets, p_row_weights, p_lse, p_loss_bar, p_grad_bar, p_stats, p_acc, p_wbar,
                    N, V, D, stride_h, stride_w, stride_gb, stride_wb,
                    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
                    ACC_IS_OUT: tl.constexpr):
    # one program per BLOCK_V vocabulary rows; p_acc (V, D) fp32 holds weight_bar while it accumulates
    i_v = tl.program_id(0)
    o_col = i_v * BLOCK_V + tl.arange(0, BLOCK_V)
    m_col = o_col < V
    o_col64 = o_col.to(tl.int64)
    o_d = tl.arange(0, BLOCK_D)
    for n0 in range(0, N, BLOCK_N):
        o_n = n0 + tl.arange(0, BLOCK_N)
        m_n = o_n < N
        o_n64 = o_n.to(tl.int64)
        b_rw = tl.load(p_row_weights + o_n, mask=m_n, other=0.0)
        b_live = b_rw != 0
        b_t = tl.load(p_targets + o_n, mask=b_live, other=-1)
        b_lse = tl.load(p_lse + o_n, mask=b_live, other=0.0)
        b_lb = tl.load(p_loss_bar + o_n, mask=b_live, other=0.0)
        b_ut = tl.load(p_stats + o_n64, mask=b_live, other=0.0)
        b_s = tl.load(p_stats + N + o_n64, mask=b_live, other=0.0)
        b_c = tl.load(p_stats + 2 * N + o_n64, mask=b_live, other=0.0)
        b_z, b_u = _logits_and_cotangent_tile(p_h, p_grad_bar, p_w, o_n64, b_live, o_col64, m_col, D,
                                              stride_h, stride_gb, stride_w, BLOCK_N, BLOCK_V, BLOCK_D, PRECISION)
        b_valid = b_live[:, None] & m_col[None, :]
        b_delta, b_gamma = _delta_gamma(b_z, b_u, o_col[None, :] == b_t[:, None], b_valid, b_lse, b_ut, b_s, b_c,
                                        b_lb, b_rw)
        b_delta_t = tl.trans(b_delta.to(p_h.dtype.element_ty))  # (BLOCK_V, BLOCK_N)
        b_gamma_t = tl.trans(b_gamma.to(p_grad_bar.dtype.element_ty))
        for d0 in range(0, D, BLOCK_D):
            m_dd = d0 + o_d < D
            m_vd = m_col[:, None] & m_dd[None, :]
            m_nd = b_live[:, None] & m_dd[None, :]
            p_a = p_acc + o_col64[:, None] * D + d0 + o_d[None, :]
            # the first row block starts from zero: the buffer is never cleared
            b_a = tl.load(p_a, mask=m_vd & (n0 > 0), other=0.0)
            b_h = tl.load(p_h + o_n64[:, None] * stride_h + d0 + o_d[None, :], mask=m_nd, other=0.0)
            b_g = tl.load(p_grad_bar + o_n64[:, None] * stride_gb + d0 + o_d[None, :], mask=m_nd, other=0.0)
            b_a = tl.dot(b_delta_t, b_h, b_a, input_precision=PRECISION)
            b_a = tl.dot(b_gamma_t, b_g, b_a, input_precision=PRECISION)
            tl.store(p_a, b_a, mask=m_vd)
    if not ACC_IS_OUT:
        for d0 in range(0, D, BLOCK_D):
            m_vd = m_col[:, None] & (d0 + o_d < D)[None, :]
            b_a = tl.load(p_acc + o_col64[:, None] * D + d0 + o_d[None, :], mask=m_vd, other=0.0)
            tl.store(p_wbar + o_col64[:, None] * stride_wb + d0 + o_d[None, :], b_a.to(p_wbar.dtype.element_ty),
                     mask=m_vd)


def block_shapes(dtype):
    """{"dhidden": ..., "dweight": ...}: (BLOCK_N, BLOCK_V, BLOCK_D, num_warps, num_stages) of each kernel for
    hidden's dtype (the kernels share only the row stats, so their tiles are independent)."""
    if interpreter_on():
        return {"dhidden": (16, 32, 16, 1, 1), "dweight": (16, 32, 16, 1, 1)}
    if dtype.itemsize == 2:
        return {"dhidden": (64, 64, 64, 4, 2), "dweight": (64, 64, 64, 4, 2)}
    # fp32 dots without TF32 run on the FMA units with their operands in registers: smaller tiles, chosen so
    # that no config spills on sm_90 (scripts/compile_kernels.py)
    return {"dhidden": (32, 64, 32, 4, 2), "dweight": (64, 32, 32, 4, 2)}


def _accumulator(out, rows, D):
    """out itself when it is a contiguous fp32 (rows, D) tensor, else a fresh fp32 buffer."""
    if out is not None and out.dtype == torch.float32 and out.is_contiguous():
        return out, True
    return torch.empty(rows * D, dtype=torch.float32, device=out.device if out is not None else None), False


def head_loss_double_backward(hidden, weight, targets, row_weights, lse, loss_bar, grad_bar, hidden_bar, weight_bar):
    """Write hidden_bar (N, d) and weight_bar (V, d) (contiguous, or None to skip one) for
    `head_loss_double_backward`; no checks, no autograd.

    hidden (N, d), weight (V, d), grad_bar (N, d) of one dtype; targets (N,) int64; row_weights, lse and
    loss_bar (N,) fp32. Extra memory: 3 N floats, and fp32 accumulators of N d (hidden_bar not fp32) and
    V d (weight_bar not fp32) elements."""
    N, D = hidden.shape
    V = weight.shape[0]
    if N == 0:
        if weight_bar is not None:
            weight_bar.zero_()
        return
    hidden = hidden if hidden.stride(1) == 1 else hidden.contiguous()
    weight = weight if weight.stride(1) == 1 else weight.contiguous()
    # an autograd cotangent may be an expanded view (stride 0)
    grad_bar = grad_bar if grad_bar.stride(1) == 1 and grad_bar.stride(0) != 0 else grad_bar.contiguous()
    targets, row_weights, lse, loss_bar = (x.contiguous() for x in (targets, row_weights, lse, loss_bar))
    shapes = block_shapes(hidden.dtype)
    precision = dot_precision(hidden.dtype)
    with on_device(hidden):
        stats = torch.empty(3 * N, dtype=torch.float32, device=hidden.device)
        need_hidden = hidden_bar is not None
        acc_h, acc_h_is_out = _accumulator(hidden_bar, N, D) if need_hidden else (stats, True)
        block_n, block_v, block_d, warps, stages = shapes["dhidden"]
        _dhidden_kernel[(triton.cdiv(N, block_n),)](
            hidden, weight, targets, row_weights, lse, loss_bar, grad_bar, stats, acc_h,
            hidden_bar if need_hidden else stats,
            N, V, D, hidden.stride(0), weight.stride(0), grad_bar.stride(0), hidden_bar.stride(0) if need_hidden else 0,
            BLOCK_N=block_n, BLOCK_V=block_v, BLOCK_D=block_d, PRECISION=precision, NEED_HIDDEN=need_hidden,
            ACC_IS_OUT=acc_h_is_out, num_warps=warps, num_stages=stages)
        if weight_bar is None:
            return
        acc_w, acc_w_is_out = _accumulator(weight_bar, V, D)
        block_n, block_v, block_d, warps, stages = shapes["dweight"]
        _dweight_kernel[(triton.cdiv(V, block_v),)](
            hidden, weight, targets, row_weights, lse, loss_bar, grad_bar, stats, acc_w, weight_bar,
            N, V, D, hidden.stride(0), weight.stride(0), grad_bar.stride(0), weight_bar.stride(0),
            BLOCK_N=block_n, BLOCK_V=block_v, BLOCK_D=block_d, PRECISION=precision, ACC_IS_OUT=acc_w_is_out,
            num_warps=warps, num_stages=stages)
