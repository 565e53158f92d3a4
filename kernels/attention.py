"""Triton kernels for causal attention with ragged lengths and GQA, FlashAttention-2 structure, and
their host launchers (no autograd here; see gradmem_fast/ops/attention.py and attention.md).

Tensors are (B, S, H, D) with D contiguous; lse and delta are (B, Hq, S) float32 with S contiguous.
Inside the kernels scores are in base 2 (q.k * scale * log2 e); lse is stored in natural log.
Offsets within one sample are 32-bit (the launchers check that each sample spans < 2**31 elements);
the batch offset is 64-bit. Grids are (blocks along S, B * heads); the launchers split the batch
so that the second dimension stays within CUDA's 65535.
"""
import torch
import triton
import triton.language as tl

from .._triton import interpreter_on
from .attention_common import (
    DEFAULT_SHAPES, DKDV_SHAPES, DKDV_SHAPES_256, DQ_SHAPES, DQ_SHAPES_256, FWD_SHAPES, FWD_SHAPES_256, LN2, LOG2E,
    LOG2E_FLOAT, autotuned, block_d, default_shape, dkdv_loop, launch, online_softmax_step, pick, precision,
    seq_len_of, strides3,
)


@triton.jit
def _fwd_kernel(
    Q, K, V, O, LSE, LSUM, LENGTHS,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_ob, stride_os, stride_oh,
    stride_lb, stride_lh, stride_ls,
    S, HQ, len_offset, qk_scale,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HAS_LENGTHS: tl.constexpr,
    STATE_OUT: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # heaviest (last) query blocks first, to shorten the causal tail
    i_m = tl.num_programs(0) - 1 - tl.program_id(0)
    i_bh = tl.program_id(1)
    i_b = i_bh // HQ
    i_h = i_bh % HQ
    i_b64 = i_b.to(tl.int64)
    seq_len = seq_len_of(LENGTHS, i_b, len_offset, S, HAS_LENGTHS)
    start_m = i_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM

    p_q = Q + i_b64 * stride_qb + i_h * stride_qh + offs_m[:, None] * stride_qs + offs_d[None, :]
    b_q = tl.load(p_q, mask=(offs_m[:, None] < S) & mask_d[None, :], other=0.0)
    p_k = K + i_b64 * stride_kb + (i_h // GROUP) * stride_kh + offs_n[:, None] * stride_ks + offs_d[None, :]
    p_v = V + i_b64 * stride_vb + (i_h // GROUP) * stride_vh + offs_n[:, None] * stride_vs + offs_d[None, :]

    b_m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    b_l = tl.zeros([BLOCK_M], tl.float32)
    b_acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    # keys [0, mid) are below every row of the block: no mask; [mid, hi) straddle the diagonal
    hi = tl.minimum(start_m + BLOCK_M, seq_len) * (start_m < seq_len).to(tl.int32)
    mid = tl.minimum(start_m, hi) // BLOCK_N * BLOCK_N
    for start_n in range(0, mid, BLOCK_N):
        b_k = tl.load(p_k + start_n * stride_ks, mask=mask_d[None, :], other=0.0)
        b_v = tl.load(p_v + start_n * stride_vs, mask=mask_d[None, :], other=0.0)
        b_s = tl.dot(b_q, tl.trans(b_k), input_precision=PRECISION) * qk_scale
        b_m, b_l, b_acc = online_softmax_step(b_s, b_v, b_m, b_l, b_acc, PRECISION)
    for start_n in range(mid, hi, BLOCK_N):
        key_ok = (start_n + offs_n) < seq_len
        b_k = tl.load(p_k + start_n * stride_ks, mask=key_ok[:, None] & mask_d[None, :], other=0.0)
        b_v = tl.load(p_v + start_n * stride_vs, mask=key_ok[:, None] & mask_d[None, :], other=0.0)
        b_s = tl.dot(b_q, tl.trans(b_k), input_precision=PRECISION) * qk_scale
        b_s = tl.where(offs_m[:, None] >= (start_n + offs_n)[None, :], b_s, float("-inf"))
        b_m, b_l, b_acc = online_softmax_step(b_s, b_v, b_m, b_l, b_acc, PRECISION)

    row_ok = offs_m < seq_len
    store_mask = (offs_m[:, None] < S) & mask_d[None, :]
    p_o = O + i_b64 * stride_ob + i_h * stride_oh + offs_m[:, None] * stride_os + offs_d[None, :]
    l_off = i_b64 * stride_lb + i_h * stride_lh + offs_m * stride_ls
    if STATE_OUT:
        tl.store(p_o, tl.where(row_ok[:, None], b_acc, 0.0), mask=store_mask)
        tl.store(LSE + l_off, tl.where(row_ok, b_m * LN2, 0.0), mask=offs_m < S)
        tl.store(LSUM + l_off, tl.where(row_ok, b_l, 0.0), mask=offs_m < S)
    else:
        b_l = tl.where(row_ok, b_l, 1.0)
        b_o = tl.where(row_ok[:, None], b_acc / b_l[:, None], 0.0)
        tl.store(p_o, b_o.to(O.dtype.element_ty), mask=store_mask)
        tl.store(LSE + l_off, tl.where(row_ok, (b_m + tl.log2(b_l)) * LN2, 0.0), mask=offs_m < S)


@triton.jit
def _bwd_preprocess_kernel(
    O, DO, DELTA, LENGTHS,
    stride_ob, stride_os, stride_oh,
    stride_dob, stride_dos, stride_doh,
    S, HQ, len_offset,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HAS_LENGTHS: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """delta (B, Hq, S) = rowsum(dO * O), zero on padded rows."""
    i_m = tl.program_id(0)
    i_bh = tl.program_id(1)
    i_b = i_bh // HQ
    i_h = i_bh % HQ
    i_b64 = i_b.to(tl.int64)
    seq_len = seq_len_of(LENGTHS, i_b, len_offset, S, HAS_LENGTHS)
    offs_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m[:, None] < seq_len) & (offs_d[None, :] < HEAD_DIM)
    b_o = tl.load(O + i_b64 * stride_ob + i_h * stride_oh + offs_m[:, None] * stride_os + offs_d[None, :],
                  mask=mask, other=0.0).to(tl.float32)
    b_do = tl.load(DO + i_b64 * stride_dob + i_h * stride_doh + offs_m[:, None] * stride_dos + offs_d[None, :],
                   mask=mask, other=0.0).to(tl.float32)
    tl.store(DELTA + i_bh.to(tl.int64) * S + offs_m, tl.sum(b_o * b_do, 1), mask=offs_m < S)



@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, LENGTHS,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_dob, stride_dos, stride_doh,
    stride_lb, stride_lh, stride_ls,
    stride_dkb, stride_dks, stride_dkh,
    stride_dvb, stride_dvs, stride_dvh,
    S, HKV, len_offset, qk_scale, sm_scale,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HAS_LENGTHS: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One key block of one kv head; loops over the query heads of its group (no atomics)."""
    i_n = tl.program_id(0)
    i_bh = tl.program_id(1)
    i_b = i_bh // HKV
    i_hk = i_bh % HKV
    i_b64 = i_b.to(tl.int64)
    seq_len = seq_len_of(LENGTHS, i_b, len_offset, S, HAS_LENGTHS)
    start_n = i_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    kv_mask = (offs_n[:, None] < seq_len) & (offs_d[None, :] < HEAD_DIM)
    b_k = tl.load(K + i_b64 * stride_kb + i_hk * stride_kh + offs_n[:, None] * stride_ks + offs_d[None, :],
                  mask=kv_mask, other=0.0)
    b_v = tl.load(V + i_b64 * stride_vb + i_hk * stride_vh + offs_n[:, None] * stride_vs + offs_d[None, :],
                  mask=kv_mask, other=0.0)
    b_dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    b_dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    # query blocks [lo, mid) straddle the diagonal; [mid, seq_len) lie wholly below it
    lo = start_n // BLOCK_M * BLOCK_M
    mid = tl.minimum((start_n + BLOCK_N + BLOCK_M - 1) // BLOCK_M * BLOCK_M, seq_len)
    for g in range(GROUP):
        i_h = i_hk * GROUP + g
        p_q = Q + i_b64 * stride_qb + i_h * stride_qh
        p_do = DO + i_b64 * stride_dob + i_h * stride_doh
        p_lse = LSE + i_b64 * stride_lb + i_h * stride_lh
        p_delta = DELTA + (i_b64 * HKV * GROUP + i_h) * S
        b_dk, b_dv = dkdv_loop(b_dk, b_dv, b_k, b_v, p_q, p_do, p_lse, p_delta, stride_qs, stride_dos, stride_ls,
                               offs_n, lo, mid, seq_len, qk_scale, True, HEAD_DIM, BLOCK_D, BLOCK_M, PRECISION)
        b_dk, b_dv = dkdv_loop(b_dk, b_dv, b_k, b_v, p_q, p_do, p_lse, p_delta, stride_qs, stride_dos, stride_ls,
                               offs_n, mid, seq_len, seq_len, qk_scale, False, HEAD_DIM, BLOCK_D, BLOCK_M,
                               PRECISION)
    key_ok = offs_n < seq_len
    store_mask = (offs_n[:, None] < S) & (offs_d[None, :] < HEAD_DIM)
    p_dk = DK + i_b64 * stride_dkb + i_hk * stride_dkh + offs_n[:, None] * stride_dks + offs_d[None, :]
    p_dv = DV + i_b64 * stride_dvb + i_hk * stride_dvh + offs_n[:, None] * stride_dvs + offs_d[None, :]
    tl.store(p_dk, tl.where(key_ok[:, None], b_dk * sm_scale, 0.0).to(DK.dtype.element_ty), mask=store_mask)
    tl.store(p_dv, tl.where(key_ok[:, None], b_dv, 0.0).to(DV.dtype.element_ty), mask=store_mask)


@triton.jit
def dq_step(b_dq, b_q, b_do, b_lse, b_delta, b_k, b_v, b_mask, qk_scale,
            CAUSAL: tl.constexpr, PRECISION: tl.constexpr):
    b_s = tl.dot(b_q, tl.trans(b_k), input_precision=PRECISION) * qk_scale
    b_p = tl.exp2(b_s - b_lse[:, None])
    if CAUSAL:
        b_p = tl.where(b_mask, b_p, 0.0)
    b_dp = tl.dot(b_do, tl.trans(b_v), input_precision=PRECISION)
    b_ds = b_p * (b_dp - b_delta[:, None])
    return b_dq + tl.dot(b_ds.to(b_k.dtype), b_k, input_precision=PRECISION)


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, DO, O, LSE, DELTA, DQ, LENGTHS,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_dob, stride_dos, stride_doh,
    stride_ob, stride_os, stride_oh,
    stride_lb, stride_lh, stride_ls,
    stride_dqb, stride_dqs, stride_dqh,
    stride_delta, S, HQ, len_offset, qk_scale, sm_scale,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HAS_LENGTHS: tl.constexpr,
    DELTA_FROM_O: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dQ of one query block. DELTA_FROM_O: computes delta = rowsum(dO * O) for its rows (zero on
    padded rows) and stores it for the dK/dV kernel launched after it; else reads delta."""
    i_m = tl.num_programs(0) - 1 - tl.program_id(0)
    i_bh = tl.program_id(1)
    i_b = i_bh // HQ
    i_h = i_bh % HQ
    i_b64 = i_b.to(tl.int64)
    seq_len = seq_len_of(LENGTHS, i_b, len_offset, S, HAS_LENGTHS)
    start_m = i_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    row_ok = offs_m < seq_len
    row_mask = row_ok[:, None] & mask_d[None, :]
    b_q = tl.load(Q + i_b64 * stride_qb + i_h * stride_qh + offs_m[:, None] * stride_qs + offs_d[None, :],
                  mask=row_mask, other=0.0)
    b_do = tl.load(DO + i_b64 * stride_dob + i_h * stride_doh + offs_m[:, None] * stride_dos + offs_d[None, :],
                   mask=row_mask, other=0.0)
    b_lse = tl.load(LSE + i_b64 * stride_lb + i_h * stride_lh + offs_m * stride_ls, mask=row_ok, other=0.0) * LOG2E
    p_delta = DELTA + i_bh.to(tl.int64) * stride_delta + offs_m
    if DELTA_FROM_O:
        b_o = tl.load(O + i_b64 * stride_ob + i_h * stride_oh + offs_m[:, None] * stride_os + offs_d[None, :],
                      mask=row_mask, other=0.0)
        b_delta = tl.sum(b_o.to(tl.float32) * b_do.to(tl.float32), 1)
        tl.store(p_delta, b_delta, mask=offs_m < S)
    else:
        b_delta = tl.load(p_delta, mask=row_ok, other=0.0)
    p_k = K + i_b64 * stride_kb + (i_h // GROUP) * stride_kh + offs_n[:, None] * stride_ks + offs_d[None, :]
    p_v = V + i_b64 * stride_vb + (i_h // GROUP) * stride_vh + offs_n[:, None] * stride_vs + offs_d[None, :]
    b_dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    hi = tl.minimum(start_m + BLOCK_M, seq_len) * (start_m < seq_len).to(tl.int32)
    mid = tl.minimum(start_m, hi) // BLOCK_N * BLOCK_N
    for start_n in range(0, mid, BLOCK_N):
        b_k = tl.load(p_k + start_n * stride_ks, mask=mask_d[None, :], other=0.0)
        b_v = tl.load(p_v + start_n * stride_vs, mask=mask_d[None, :], other=0.0)
        b_dq = dq_step(b_dq, b_q, b_do, b_lse, b_delta, b_k, b_v, 0, qk_scale, False, PRECISION)
    for start_n in range(mid, hi, BLOCK_N):
        key_ok = (start_n + offs_n) < seq_len
        b_k = tl.load(p_k + start_n * stride_ks, mask=key_ok[:, None] & mask_d[None, :], other=0.0)
        b_v = tl.load(p_v + start_n * stride_vs, mask=key_ok[:, None] & mask_d[None, :], other=0.0)
        b_mask = offs_m[:, None] >= (start_n + offs_n)[None, :]
        b_dq = dq_step(b_dq, b_q, b_do, b_lse, b_delta, b_k, b_v, b_mask, qk_scale, True, PRECISION)
    p_dq = DQ + i_b64 * stride_dqb + i_h * stride_dqh + offs_m[:, None] * stride_dqs + offs_d[None, :]
    tl.store(p_dq, tl.where(row_ok[:, None], b_dq * sm_scale, 0.0).to(DQ.dtype.element_ty),
             mask=(offs_m[:, None] < S) & mask_d[None, :])


_KEY = ["BLOCK_D", "GROUP", "HAS_LENGTHS"]
_fwd_tuned = autotuned(_fwd_kernel, _KEY + ["STATE_OUT"], DEFAULT_SHAPES["fwd"], FWD_SHAPES, FWD_SHAPES_256)
_dkdv_tuned = autotuned(_bwd_dkdv_kernel, _KEY, DEFAULT_SHAPES["dkdv"], DKDV_SHAPES, DKDV_SHAPES_256)
_dq_tuned = autotuned(_bwd_dq_kernel, _KEY + ["DELTA_FROM_O"], DEFAULT_SHAPES["dq"], DQ_SHAPES, DQ_SHAPES_256)

# ---------------------------------------------------------------- launchers


def launch_forward(q, k, v, o, lse, lsum, lengths, len_offset, scale, *, state_out=False, blocks=None):
    """Writes o (or the state accumulator), lse (or row max) and lsum (state only); lengths None:
    every row valid."""
    B, S, Hq, D = q.shape
    if B * Hq * S == 0:
        return
    kernel, extra = pick(_fwd_tuned, _fwd_kernel, blocks, default_shape(DEFAULT_SHAPES["fwd"], q.dtype, D))
    grid = lambda nb: lambda meta: (triton.cdiv(S, meta["BLOCK_M"]), nb * Hq)  # noqa: E731
    launch(kernel, grid, B, Hq, [
        q, k, v, o, lse, lsum if lsum is not None else lse, lengths if lengths is not None else lse,
        *strides3(q), *strides3(k), *strides3(v), *strides3(o), *strides3(lse),
        S, Hq, len_offset, scale * LOG2E_FLOAT], dict(
        GROUP=Hq // k.shape[2], HEAD_DIM=D, BLOCK_D=block_d(D), HAS_LENGTHS=lengths is not None,
        STATE_OUT=state_out, PRECISION=precision(q.dtype), **extra))


def launch_preprocess(o, do, delta, lengths, len_offset):
    """delta (B, Hq, S) contiguous float32 = rowsum(do * o) over valid rows (the layer-0 backward, whose
    dK/dV needs delta of context rows that have no dQ program)."""
    B, S, Hq, D = o.shape
    if B * Hq * S == 0:
        return
    BLOCK_M = 16 if interpreter_on() else 64
    launch(_bwd_preprocess_kernel, lambda nb: (triton.cdiv(S, BLOCK_M), nb * Hq), B, Hq, [
        o, do, delta, lengths if lengths is not None else delta, *strides3(o), *strides3(do), S, Hq, len_offset],
        dict(HEAD_DIM=D, BLOCK_D=block_d(D), HAS_LENGTHS=lengths is not None, BLOCK_M=BLOCK_M))


def launch_dq(q, k, v, do, lse, delta, dq, lengths, len_offset, scale, *, o=None, blocks=None):
    """dq for rows of q; delta may be a view whose rows are delta.stride(1) apart. With o given the
    kernel writes delta = rowsum(do * o) (0 on padded rows) for its rows and uses it; else it reads
    delta."""
    B, S, Hq, D = q.shape
    if B * Hq * S == 0:
        return
    kernel, extra = pick(_dq_tuned, _bwd_dq_kernel, blocks, default_shape(DEFAULT_SHAPES["dq"], q.dtype, D))
    grid = lambda nb: lambda meta: (triton.cdiv(S, meta["BLOCK_M"]), nb * Hq)  # noqa: E731
    launch(kernel, grid, B, Hq, [
        q, k, v, do, o if o is not None else do, lse, delta, dq, lengths if lengths is not None else delta,
        *strides3(q), *strides3(k), *strides3(v), *strides3(do), *strides3(o if o is not None else do),
        *strides3(lse), *strides3(dq), delta.stride(1), S, Hq, len_offset, scale * LOG2E_FLOAT, scale],
        dict(GROUP=Hq // k.shape[2], HEAD_DIM=D, BLOCK_D=block_d(D), HAS_LENGTHS=lengths is not None,
             DELTA_FROM_O=o is not None, PRECISION=precision(q.dtype), **extra))


def launch_dkdv(q, k, v, do, lse, delta, dk, dv, lengths, scale, *, blocks=None):
    """dk, dv (B, S, Hkv, D) summed over each kv head's query heads; delta (B, Hq, S) contiguous."""
    B, S, Hq, D = q.shape
    Hkv = k.shape[2]
    kernel, extra = pick(_dkdv_tuned, _bwd_dkdv_kernel, None if blocks is None else blocks[::-1],
                         default_shape(DEFAULT_SHAPES["dkdv"], q.dtype, D))
    grid = lambda nb: lambda meta: (triton.cdiv(S, meta["BLOCK_N"]), nb * Hkv)  # noqa: E731
    launch(kernel, grid, B, Hkv, [
        q, k, v, do, lse, delta, dk, dv, lengths,
        *strides3(q), *strides3(k), *strides3(v), *strides3(do), *strides3(lse), *strides3(dk), *strides3(dv),
        S, Hkv, 0, scale * LOG2E_FLOAT, scale], dict(
        GROUP=Hq // Hkv, HEAD_DIM=D, BLOCK_D=block_d(D), HAS_LENGTHS=True, PRECISION=precision(q.dtype), **extra))


def attention_forward(q, k, v, lengths, scale, *, out=None, blocks=None):
    B, S, Hq, D = q.shape
    if out is None:
        out = (torch.empty((B, S, Hq, D), dtype=q.dtype, device=q.device),
               torch.empty((B, Hq, S), dtype=torch.float32, device=q.device))
    launch_forward(q, k, v, out[0], out[1], None, lengths, 0, scale, blocks=blocks)
    return out[0], out[1]


def attention_backward(do, q, k, v, o, lse, lengths, scale, *, out=None, blocks=None):
    B, S, Hq, D = q.shape
    Hkv = k.shape[2]
    if out is None:
        out = (torch.empty((B, S, Hq, D), dtype=q.dtype, device=q.device),
               torch.empty((B, S, Hkv, D), dtype=q.dtype, device=q.device),
               torch.empty((B, S, Hkv, D), dtype=q.dtype, device=q.device))
    dq, dk, dv = out
    if B * Hq * S == 0:
        return dq, dk, dv
    # the dQ kernel writes delta; the dK/dV kernel, next on the same stream, reads it
    delta = torch.empty((B, Hq, S), dtype=torch.float32, device=q.device)
    launch_dq(q, k, v, do, lse, delta, dq, lengths, 0, scale, o=o, blocks=blocks)
    launch_dkdv(q, k, v, do, lse, delta, dk, dv, lengths, scale, blocks=blocks)
    return dq, dk, dv


def context_attention_state(q_ctx, k_ctx, v_ctx, ctx_lengths, scale, *, out=None, blocks=None):
    B, T, Hq, D = q_ctx.shape
    if out is None:
        out = (torch.empty((B, T, Hq, D), dtype=torch.float32, device=q_ctx.device),
               torch.empty((B, Hq, T), dtype=torch.float32, device=q_ctx.device),
               torch.empty((B, Hq, T), dtype=torch.float32, device=q_ctx.device))
    launch_forward(q_ctx, k_ctx, v_ctx, out[0], out[1], out[2], ctx_lengths, 0, scale, state_out=True,
                   blocks=blocks)
    return tuple(out)
