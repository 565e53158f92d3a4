"""Triton kernels and launchers for the layer-0 reuse path: per write step, only the m memory keys are
new, so context rows merge their precomputed context state (kernels/attention.py, STATE_OUT) with
the memory keys, and the backward computes only the memory rows' gradients. See
gradmem_fast/ops/attention.md.

Shapes: q_mem, k_mem, v_mem (B, m, H*, D); q_ctx (B, T, Hq, D); state acc (B, T, Hq, D) fp32,
row_max / row_sum (B, Hq, T) fp32; o (B, m+T, Hq, D); lse and delta (B, Hq, m+T) fp32.
"""
import torch
import triton
import triton.language as tl

from .attention import launch_dq, launch_forward, launch_preprocess
from .attention_common import (
    LN2, LOG2E, LOG2E_FLOAT, autotuned, block_d, default_shape, dkdv_loop, launch, online_softmax_step, pick,
    precision, strides3,
)

# (BLOCK_M, BLOCK_N, num_warps, num_stages), the first one the 16-bit default. BLOCK_N runs over the m
# memory keys (8 to 32), so it stays small; BLOCK_M runs over context rows.
CTX_SHAPES = [(64, 16, 4, 2), (128, 16, 4, 2), (64, 32, 4, 2), (128, 32, 8, 2), (64, 64, 4, 2)]
MEM_DKDV_SHAPES = [(64, 16, 4, 2), (128, 16, 8, 2), (32, 16, 4, 2), (64, 32, 4, 2), (128, 32, 8, 2),
                   (32, 64, 4, 3)]
# at BLOCK_D = 256, the first one the 16-bit default (see attention_common.FWD_SHAPES_256)
CTX_SHAPES_256 = [(64, 16, 8, 2), (64, 32, 8, 2), (64, 16, 8, 3), (32, 16, 4, 2), (32, 32, 8, 2)]
MEM_DKDV_SHAPES_256 = [(32, 16, 8, 2), (32, 16, 8, 1), (16, 16, 8, 1)]
# see attention_common.DEFAULT_SHAPES
DEFAULT_SHAPES = {
    "ctx": {(False, 16): (64, 16, 4, 2), (False, 32): (64, 16, 4, 2), (False, 64): (64, 16, 4, 2),
            (False, 128): (64, 16, 4, 2), (False, 256): CTX_SHAPES_256[0],
            (True, 16): (64, 16, 4, 2), (True, 32): (64, 16, 4, 2), (True, 64): (64, 16, 8, 2),
            (True, 128): (64, 16, 8, 2), (True, 256): (64, 16, 8, 2)},
    "mem_dkdv": {(False, 16): (64, 16, 4, 2), (False, 32): (64, 16, 4, 2), (False, 64): (64, 16, 4, 2),
                 (False, 128): (64, 16, 8, 2), (False, 256): MEM_DKDV_SHAPES_256[0],
                 (True, 16): (32, 16, 4, 2), (True, 32): (32, 16, 4, 2), (True, 64): (32, 16, 8, 1),
                 (True, 128): (32, 16, 8, 1), (True, 256): (32, 16, 8, 1)},
}


@triton.jit
def _ctx_fwd_kernel(
    Q, K, V, ACC, RMAX, RSUM, O, LSE, LENGTHS,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_ab, stride_as, stride_ah,
    stride_rb, stride_rh, stride_rs,
    stride_ob, stride_os, stride_oh,
    stride_lb, stride_lh, stride_ls,
    T, M, HQ, qk_scale,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Context rows: start the online softmax from the context state, fold in the M memory keys."""
    i_m = tl.program_id(0)
    i_bh = tl.program_id(1)
    i_b = i_bh // HQ
    i_h = i_bh % HQ
    i_b64 = i_b.to(tl.int64)
    n_ctx = tl.minimum(tl.maximum(tl.load(LENGTHS + i_b), 0), T)
    start_m = i_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    row_ok = offs_m < n_ctx
    row_mask = row_ok[:, None] & mask_d[None, :]
    b_q = tl.load(Q + i_b64 * stride_qb + i_h * stride_qh + offs_m[:, None] * stride_qs + offs_d[None, :],
                  mask=row_mask, other=0.0)
    b_acc = tl.load(ACC + i_b64 * stride_ab + i_h * stride_ah + offs_m[:, None] * stride_as + offs_d[None, :],
                    mask=row_mask, other=0.0)
    r_off = i_b64 * stride_rb + i_h * stride_rh + offs_m * stride_rs
    b_m = tl.load(RMAX + r_off, mask=row_ok, other=0.0) * LOG2E
    b_l = tl.load(RSUM + r_off, mask=row_ok, other=0.0)
    p_k = K + i_b64 * stride_kb + (i_h // GROUP) * stride_kh + offs_n[:, None] * stride_ks + offs_d[None, :]
    p_v = V + i_b64 * stride_vb + (i_h // GROUP) * stride_vh + offs_n[:, None] * stride_vs + offs_d[None, :]
    hi = M * (start_m < n_ctx).to(tl.int32)
    for start_n in range(0, hi, BLOCK_N):
        key_ok = (start_n + offs_n) < M
        b_k = tl.load(p_k + start_n * stride_ks, mask=key_ok[:, None] & mask_d[None, :], other=0.0)
        b_v = tl.load(p_v + start_n * stride_vs, mask=key_ok[:, None] & mask_d[None, :], other=0.0)
        b_s = tl.dot(b_q, tl.trans(b_k), input_precision=PRECISION) * qk_scale
        b_s = tl.where(key_ok[None, :], b_s, float("-inf"))
        b_m, b_l, b_acc = online_softmax_step(b_s, b_v, b_m, b_l, b_acc, PRECISION)
    b_l = tl.where(row_ok, b_l, 1.0)
    b_o = tl.where(row_ok[:, None], b_acc / b_l[:, None], 0.0)
    p_o = O + i_b64 * stride_ob + i_h * stride_oh + offs_m[:, None] * stride_os + offs_d[None, :]
    tl.store(p_o, b_o.to(O.dtype.element_ty), mask=(offs_m[:, None] < T) & mask_d[None, :])
    tl.store(LSE + i_b64 * stride_lb + i_h * stride_lh + offs_m * stride_ls,
             tl.where(row_ok, (b_m + tl.log2(b_l)) * LN2, 0.0), mask=offs_m < T)


@triton.jit
def _mem_dkdv_kernel(
    QM, QC, K, V, DO, LSE, DELTA, DK, DV, LENGTHS,
    stride_qmb, stride_qms, stride_qmh,
    stride_qcb, stride_qcs, stride_qch,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_dob, stride_dos, stride_doh,
    stride_lb, stride_lh, stride_ls,
    stride_dkb, stride_dks, stride_dkh,
    stride_dvb, stride_dvs, stride_dvh,
    M, T, HKV, qk_scale, sm_scale,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dK, dV of one block of memory keys from the memory rows (causal) and all valid context rows."""
    i_n = tl.program_id(0)
    i_bh = tl.program_id(1)
    i_b = i_bh // HKV
    i_hk = i_bh % HKV
    i_b64 = i_b.to(tl.int64)
    n_ctx = tl.minimum(tl.maximum(tl.load(LENGTHS + i_b), 0), T)
    start_n = i_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    kv_mask = (offs_n[:, None] < M) & (offs_d[None, :] < HEAD_DIM)
    b_k = tl.load(K + i_b64 * stride_kb + i_hk * stride_kh + offs_n[:, None] * stride_ks + offs_d[None, :],
                  mask=kv_mask, other=0.0)
    b_v = tl.load(V + i_b64 * stride_vb + i_hk * stride_vh + offs_n[:, None] * stride_vs + offs_d[None, :],
                  mask=kv_mask, other=0.0)
    b_dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    b_dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    lo = start_n // BLOCK_M * BLOCK_M
    for g in range(GROUP):
        i_h = i_hk * GROUP + g
        p_do = DO + i_b64 * stride_dob + i_h * stride_doh
        p_lse = LSE + i_b64 * stride_lb + i_h * stride_lh
        p_delta = DELTA + (i_b64 * HKV * GROUP + i_h) * (M + T)
        b_dk, b_dv = dkdv_loop(b_dk, b_dv, b_k, b_v, QM + i_b64 * stride_qmb + i_h * stride_qmh, p_do, p_lse,
                               p_delta, stride_qms, stride_dos, stride_ls, offs_n, lo, M, M, qk_scale,
                               True, HEAD_DIM, BLOCK_D, BLOCK_M, PRECISION)
        b_dk, b_dv = dkdv_loop(b_dk, b_dv, b_k, b_v, QC + i_b64 * stride_qcb + i_h * stride_qch,
                               p_do + M * stride_dos, p_lse + M * stride_ls, p_delta + M,
                               stride_qcs, stride_dos, stride_ls, offs_n, 0, n_ctx, n_ctx, qk_scale,
                               False, HEAD_DIM, BLOCK_D, BLOCK_M, PRECISION)
    p_dk = DK + i_b64 * stride_dkb + i_hk * stride_dkh + offs_n[:, None] * stride_dks + offs_d[None, :]
    p_dv = DV + i_b64 * stride_dvb + i_hk * stride_dvh + offs_n[:, None] * stride_dvs + offs_d[None, :]
    tl.store(p_dk, (b_dk * sm_scale).to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(p_dv, b_dv.to(DV.dtype.element_ty), mask=kv_mask)


_KEY = ["BLOCK_D", "GROUP"]
_ctx_fwd_tuned = autotuned(_ctx_fwd_kernel, _KEY, DEFAULT_SHAPES["ctx"], CTX_SHAPES, CTX_SHAPES_256)
_mem_dkdv_tuned = autotuned(_mem_dkdv_kernel, _KEY, DEFAULT_SHAPES["mem_dkdv"], MEM_DKDV_SHAPES, MEM_DKDV_SHAPES_256)


def memory_attention_forward(q_mem, k_mem, v_mem, q_ctx, state, ctx_lengths, scale, *, out=None, blocks=None):
    B, m, Hq, D = q_mem.shape
    T = q_ctx.shape[1]
    if out is None:
        out = (torch.empty((B, m + T, Hq, D), dtype=q_mem.dtype, device=q_mem.device),
               torch.empty((B, Hq, m + T), dtype=torch.float32, device=q_mem.device))
    o, lse = out
    launch_forward(q_mem, k_mem, v_mem, o[:, :m], lse[:, :, :m], None, None, 0, scale, blocks=blocks)
    if B * Hq * T == 0:
        return o, lse
    acc, row_max, row_sum = state
    o_ctx, lse_ctx = o[:, m:], lse[:, :, m:]
    kernel, extra = pick(_ctx_fwd_tuned, _ctx_fwd_kernel, blocks,
                         default_shape(DEFAULT_SHAPES["ctx"], q_mem.dtype, D))
    grid = lambda nb: lambda meta: (triton.cdiv(T, meta["BLOCK_M"]), nb * Hq)  # noqa: E731
    launch(kernel, grid, B, Hq, [
        q_ctx, k_mem, v_mem, acc, row_max, row_sum, o_ctx, lse_ctx, ctx_lengths,
        *strides3(q_ctx), *strides3(k_mem), *strides3(v_mem), *strides3(acc), *strides3(row_max),
        *strides3(o_ctx), *strides3(lse_ctx), T, m, Hq, scale * LOG2E_FLOAT], dict(
        GROUP=Hq // k_mem.shape[2], HEAD_DIM=D, BLOCK_D=block_d(D), PRECISION=precision(q_mem.dtype), **extra))
    return o, lse


def memory_attention_backward(do, q_mem, k_mem, v_mem, q_ctx, o, lse, ctx_lengths, scale, *, out=None,
                              blocks=None):
    B, m, Hq, D = q_mem.shape
    Hkv = k_mem.shape[2]
    T = q_ctx.shape[1]
    if out is None:
        out = (torch.empty_like(q_mem, memory_format=torch.contiguous_format),
               torch.empty((B, m, Hkv, D), dtype=q_mem.dtype, device=q_mem.device),
               torch.empty((B, m, Hkv, D), dtype=q_mem.dtype, device=q_mem.device))
    dq, dk, dv = out
    if B * Hq * m == 0:
        return dq, dk, dv
    delta = torch.empty((B, Hq, m + T), dtype=torch.float32, device=q_mem.device)
    launch_preprocess(o, do, delta, ctx_lengths, m)
    launch_dq(q_mem, k_mem, v_mem, do[:, :m], lse[:, :, :m], delta[:, :, :m], dq, None, 0, scale, blocks=blocks)
    kernel, extra = pick(_mem_dkdv_tuned, _mem_dkdv_kernel, None if blocks is None else blocks[::-1],
                         default_shape(DEFAULT_SHAPES["mem_dkdv"], q_mem.dtype, D))
    grid = lambda nb: lambda meta: (triton.cdiv(m, meta["BLOCK_N"]), nb * Hkv)  # noqa: E731
    launch(kernel, grid, B, Hkv, [
        q_mem, q_ctx, k_mem, v_mem, do, lse, delta, dk, dv, ctx_lengths,
        *strides3(q_mem), *strides3(q_ctx), *strides3(k_mem), *strides3(v_mem), *strides3(do), *strides3(lse),
        *strides3(dk), *strides3(dv), m, T, Hkv, scale * LOG2E_FLOAT, scale], dict(
        GROUP=Hq // Hkv, HEAD_DIM=D, BLOCK_D=block_d(D), PRECISION=precision(q_mem.dtype), **extra))
    return dq, dk, dv
