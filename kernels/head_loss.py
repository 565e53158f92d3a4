"""Triton kernels and host launcher for the fused LM head + cross-entropy (see
gradmem_fast/ops/head_loss.md).

Two methods, same results:
- "chunked": a fixed block of C rows at a time, logits (C, V) = H_c W^T by a library GEMM into one
  reused buffer, `_softmax_grad_kernel` turns each row in place into w_i (softmax - onehot) and
  writes the loss, then grad_c = P_c W by a second GEMM. Matrix-multiply speed; extra memory C * V.
- "fused": everything in Triton, `_fused_head_loss_kernel`, one pass over the vocabulary per block
  of rows with an online softmax (flash-attention style, with W playing both keys and values);
  logits exist only tile by tile; extra memory is an fp32 (N, d) accumulator.
"""
import os

import torch
import triton
import triton.language as tl

from gradmem_fast._triton import interpreter_on

from .device import on_device
from .precision import dot_precision

METHODS = ("chunked", "fused")
# bytes of the chunked method's logits buffer; the rows per chunk follow from V and the dtype
CHUNK_BYTES = 256 << 20
# elements the chunked method's logits rows are padded to (64 bf16 = 128 bytes)
ROW_ALIGN = 64
# "GRADMEM_FAST_HEAD_LOSS_METHOD" forces a method, for debugging
ENV_METHOD = "GRADMEM_FAST_HEAD_LOSS_METHOD"


@triton.jit
def _log1p(x):
    # log(1 + x), accurate for small x too (no libdevice under the interpreter): with u = fl(1 + x),
    # log(u) * x / (u - 1) cancels the rounding of u
    u = 1.0 + x
    return tl.where(u == 1.0, x, tl.log(u) * (x / tl.where(u == 1.0, 1.0, u - 1.0)))


@triton.jit
def _row_loss(b_m, b_zt, b_s_nt):
    # lse - z_t from the max m, the target logit and s_nt = sum_{v != t} exp(z_v - m), without
    # subtracting two numbers of the size of m: lse - z_t = log1p(s_nt / exp(z_t - m))
    b_et = tl.exp(b_zt - b_m)
    b_direct = (b_m - b_zt) + tl.log(b_s_nt + b_et)
    return tl.where(b_et > 1e-30, _log1p(b_s_nt / tl.maximum(b_et, 1e-30)), b_direct)


@triton.jit
def acc_rows_times_weight(p_acc, p_w, b_x, b_alpha, o_n64, m_n, o_col64, m_col, v0, D, stride_w,
                          BLOCK_D: tl.constexpr, RESCALE: tl.constexpr, PRECISION: tl.constexpr):
    """acc[rows] = (alpha * if RESCALE) acc[rows] + b_x @ W[cols] over D in BLOCK_D pieces: acc fp32 (N, D) at
    p_acc, b_x (BLOCK_N, BLOCK_V) in W's dtype, W (V, D) rows o_col64. The first vocabulary block (v0 == 0)
    starts from zero: the buffer is never cleared."""
    o_d = tl.arange(0, BLOCK_D)
    for d0 in range(0, D, BLOCK_D):
        m_dd = d0 + o_d < D
        m_nd = m_n[:, None] & m_dd[None, :]
        p_a = p_acc + o_n64[:, None] * D + d0 + o_d[None, :]
        b_a = tl.load(p_a, mask=m_nd & (v0 > 0), other=0.0)
        if RESCALE:
            b_a = b_a * b_alpha[:, None]
        b_wv = tl.load(p_w + o_col64[:, None] * stride_w + d0 + o_d[None, :],
                       mask=m_col[:, None] & m_dd[None, :], other=0.0)  # (BLOCK_V, BLOCK_D)
        b_a = tl.dot(b_x, b_wv, b_a, input_precision=PRECISION)
        tl.store(p_a, b_a, mask=m_nd)


@triton.jit
def _softmax_grad_kernel(p_logits, p_targets, p_row_weights, p_loss, stride_row, V, BLOCK_V: tl.constexpr):
    # one program per row: logits row (V,) -> w * (softmax - onehot(t)) in place, loss = lse - z_t
    i_row = tl.program_id(0)
    p_row = p_logits + i_row.to(tl.int64) * stride_row
    b_w = tl.load(p_row_weights + i_row)
    b_t = tl.load(p_targets + i_row)
    o_v = tl.arange(0, BLOCK_V)
    if b_w == 0:
        # the rows still feed the gradient GEMM: they must hold zeros, not stale logits or NaN
        b_zero = tl.zeros([BLOCK_V], dtype=p_logits.dtype.element_ty)
        for v0 in range(0, V, BLOCK_V):
            tl.store(p_row + v0 + o_v, b_zero, mask=v0 + o_v < V)
        tl.store(p_loss + i_row, 0.0)
    else:
        t_ok = (b_t >= 0) & (b_t < V)
        b_zt = tl.load(p_row + b_t, mask=t_ok, other=0.0).to(tl.float32)
        # the target column is kept out of the sum so that p_t - 1 = -s_nt / s has no cancellation
        b_m = float("-inf")
        b_s_nt = 0.0
        for v0 in range(0, V, BLOCK_V):
            o_col = v0 + o_v
            b_z = tl.load(p_row + o_col, mask=o_col < V, other=float("-inf")).to(tl.float32)
            b_m_new = tl.maximum(b_m, tl.max(b_z, axis=0))
            b_e = tl.where(o_col == b_t, 0.0, tl.exp(b_z - b_m_new))
            b_s_nt = b_s_nt * tl.exp(b_m - b_m_new) + tl.sum(b_e, axis=0)
            b_m = b_m_new
        tl.store(p_loss + i_row, _row_loss(b_m, b_zt, b_s_nt))
        b_inv_s = 1.0 / (b_s_nt + tl.exp(b_zt - b_m))
        for v0 in range(0, V, BLOCK_V):
            o_col = v0 + o_v
            b_z = tl.load(p_row + o_col, mask=o_col < V, other=0.0).to(tl.float32)
            b_p = tl.where(o_col == b_t, -b_s_nt * b_inv_s, tl.exp(b_z - b_m) * b_inv_s)
            tl.store(p_row + o_col, (b_w * b_p).to(p_logits.dtype.element_ty), mask=o_col < V)


@triton.jit
def _fused_head_loss_kernel(p_h, p_w, p_targets, p_row_weights, p_loss, p_acc, p_grad,
                            N, V, D, stride_h, stride_w, stride_g,
                            BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
                            PRECISION: tl.constexpr):
    # one program per BLOCK_N rows; p_acc (N, D) fp32 holds sum_{v != t} exp(z_v - m) W_v for its rows
    i_n = tl.program_id(0)
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_n = o_n < N
    o_n64 = o_n.to(tl.int64)
    b_rw = tl.load(p_row_weights + o_n, mask=m_n, other=0.0)
    b_t = tl.load(p_targets + o_n, mask=m_n, other=-1)
    b_live = b_rw != 0
    o_d = tl.arange(0, BLOCK_D)
    o_v = tl.arange(0, BLOCK_V)
    if tl.max(b_live.to(tl.int32), axis=0) == 0:
        # no row of this block predicts anything: zeros out, no work
        for d0 in range(0, D, BLOCK_D):
            m_nd = m_n[:, None] & (d0 + o_d < D)[None, :]
            tl.store(p_grad + o_n64[:, None] * stride_g + d0 + o_d[None, :],
                     tl.zeros([BLOCK_N, BLOCK_D], dtype=p_grad.dtype.element_ty), mask=m_nd)
        tl.store(p_loss + o_n, tl.zeros([BLOCK_N], dtype=tl.float32), mask=m_n)
    else:
        b_m = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)
        b_s_nt = tl.zeros([BLOCK_N], dtype=tl.float32)
        b_zt = tl.zeros([BLOCK_N], dtype=tl.float32)
        for v0 in range(0, V, BLOCK_V):
            o_col = v0 + o_v
            m_col = o_col < V
            o_col64 = o_col.to(tl.int64)
            b_z = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
            for d0 in range(0, D, BLOCK_D):
                m_dd = d0 + o_d < D
                b_h = tl.load(p_h + o_n64[:, None] * stride_h + d0 + o_d[None, :],
                              mask=m_n[:, None] & m_dd[None, :], other=0.0)  # (BLOCK_N, BLOCK_D)
                b_wt = tl.load(p_w + o_col64[None, :] * stride_w + d0 + o_d[:, None],
                               mask=m_col[None, :] & m_dd[:, None], other=0.0)  # (BLOCK_D, BLOCK_V)
                b_z = tl.dot(b_h, b_wt, b_z, input_precision=PRECISION)
            b_z = tl.where(m_col[None, :], b_z, float("-inf"))
            b_is_t = o_col[None, :] == b_t[:, None]
            b_zt += tl.sum(tl.where(b_is_t, b_z, 0.0), axis=1)
            # every block holds at least one real column, so b_m_new is finite
            b_m_new = tl.maximum(b_m, tl.max(b_z, axis=1))
            b_alpha = tl.exp(b_m - b_m_new)
            # (BLOCK_N, BLOCK_V), 0 on padding columns and on the target column (added exactly at the end)
            b_p = tl.where(b_is_t, 0.0, tl.exp(b_z - b_m_new[:, None]))
            b_s_nt = b_s_nt * b_alpha + tl.sum(b_p, axis=1)
            b_m = b_m_new
            acc_rows_times_weight(p_acc, p_w, b_p.to(p_w.dtype.element_ty), b_alpha, o_n64, m_n, o_col64, m_col,
                                  v0, D, stride_w, BLOCK_D, True, PRECISION)
        tl.store(p_loss + o_n, tl.where(b_live, _row_loss(b_m, b_zt, b_s_nt), 0.0), mask=m_n)
        b_inv_s = 1.0 / (b_s_nt + tl.exp(b_zt - b_m))
        m_t = m_n & b_live & (b_t >= 0) & (b_t < V)
        # a clamp keeps the target pointers in range (the loads are masked by m_t); a tl.where on
        # m_t here breaks Triton 3.6's layout pass (RemoveLayoutConversions) at every dtype
        b_t64 = tl.minimum(tl.maximum(b_t, 0), V - 1).to(tl.int64)
        for d0 in range(0, D, BLOCK_D):
            m_dd = d0 + o_d < D
            m_nd = m_n[:, None] & m_dd[None, :]
            b_a = tl.load(p_acc + o_n64[:, None] * D + d0 + o_d[None, :], mask=m_nd, other=0.0)
            b_wt = tl.load(p_w + b_t64[:, None] * stride_w + d0 + o_d[None, :],
                           mask=m_t[:, None] & m_dd[None, :], other=0.0).to(tl.float32)
            # p_t - 1 = -s_nt / s
            b_g = (b_rw * b_inv_s)[:, None] * (b_a - b_s_nt[:, None] * b_wt)
            b_g = tl.where(b_live[:, None], b_g, 0.0)
            tl.store(p_grad + o_n64[:, None] * stride_g + d0 + o_d[None, :],
                     b_g.to(p_grad.dtype.element_ty), mask=m_nd)


def chunk_rows_for(N, V, dtype):
    """Rows per chunk of the chunked method: a buffer of about CHUNK_BYTES, a multiple of 128 rows."""
    rows = CHUNK_BYTES // (triton.cdiv(V, ROW_ALIGN) * ROW_ALIGN * dtype.itemsize)
    if rows >= 128:
        rows -= rows % 128
    return max(1, min(N, rows))


def softmax_grad_(logits, targets, row_weights, loss):
    """In place: logits (R, V) -> w_i (softmax(z_i) - onehot(t_i)); loss (R,) fp32 = lse - z_t."""
    R, V = logits.shape
    if R == 0:
        return
    if interpreter_on():
        block_v, warps = min(triton.next_power_of_2(V), 128), 1
    else:
        block_v = min(triton.next_power_of_2(V), 4096)
        warps = 8 if block_v >= 2048 else 4
    _softmax_grad_kernel[(R,)](logits, targets, row_weights, loss, logits.stride(0), V,
                               BLOCK_V=block_v, num_warps=warps)


def _chunked(hidden, weight, targets, row_weights, loss, grad, chunk_rows, workspace):
    N, V = hidden.shape[0], weight.shape[0]
    C = chunk_rows or chunk_rows_for(N, V, hidden.dtype)
    # rows of the logits buffer start on 128-byte boundaries whatever V is (e.g. 50257), which the
    # GEMMs' vectorised loads and stores need
    ld = triton.cdiv(V, ROW_ALIGN) * ROW_ALIGN
    if workspace is None or workspace.numel() < C * ld:
        workspace = torch.empty(C * ld, dtype=hidden.dtype, device=hidden.device)
    buf = workspace[: C * ld].view(C, ld)[:, :V]
    w_t = weight.t()
    for start in range(0, N, C):
        stop = min(N, start + C)
        z = buf[: stop - start]  # (rows, V), row stride ld
        torch.mm(hidden[start:stop], w_t, out=z)
        softmax_grad_(z, targets[start:stop], row_weights[start:stop], loss[start:stop])
        torch.mm(z, weight, out=grad[start:stop])


def _fused(hidden, weight, targets, row_weights, loss, grad, acc):
    N, D = hidden.shape
    V = weight.shape[0]
    if acc is None or acc.numel() < N * D:
        acc = torch.empty(N * D, dtype=torch.float32, device=hidden.device)
    if interpreter_on():
        block_n, block_v, block_d, warps, stages = 16, 32, 32, 1, 1
    else:
        # shared memory per stage: the two dot operand pairs; fp32 operands take twice the bytes
        block_n, block_v = 64, 128
        block_d, stages = (64, 3) if hidden.element_size() == 2 else (32, 2)
        warps = 8
    _fused_head_loss_kernel[(triton.cdiv(N, block_n),)](
        hidden, weight, targets, row_weights, loss, acc, grad,
        N, V, D, hidden.stride(0), weight.stride(0), grad.stride(0),
        BLOCK_N=block_n, BLOCK_V=block_v, BLOCK_D=block_d, PRECISION=dot_precision(hidden.dtype),
        num_warps=warps, num_stages=stages)


def head_loss(hidden, weight, targets, row_weights, loss, grad, *, method=None, chunk_rows=None,
              workspace=None):
    """Write loss (N,) fp32 and grad (N, d) for `fused_head_loss`; no checks, no autograd.

    hidden (N, d) and weight (V, d) with unit stride along d; targets (N,) int64; row_weights (N,)
    fp32; loss and grad contiguous. method: "chunked" or "fused" (None: $GRADMEM_FAST_HEAD_LOSS_METHOD,
    else "chunked"). chunk_rows: rows per chunk of the chunked method (default: `chunk_rows_for`).
    workspace: optional flat reusable buffer (chunked: >= chunk_rows * V rounded up to ROW_ALIGN
    elements of hidden's dtype; fused: >= N * d float32).
    """
    if method is None:
        method = os.environ.get(ENV_METHOD) or "chunked"
    if hidden.shape[0] == 0:
        return
    if hidden.stride(1) != 1:
        hidden = hidden.contiguous()
    if weight.stride(1) != 1:
        weight = weight.contiguous()
    targets = targets.contiguous()
    row_weights = row_weights.contiguous()
    if method not in METHODS:
        raise ValueError(f"method={method!r} is not one of {METHODS}")
    with on_device(hidden):
        if method == "chunked":
            _chunked(hidden, weight, targets, row_weights, loss, grad, chunk_rows, workspace)
        else:
            _fused(hidden, weight, targets, row_weights, loss, grad, workspace)
