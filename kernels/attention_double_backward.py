"""Triton kernels for attention's double backward, flash style, and their host launcher (no autograd here;
see gradmem_fast/ops/attention_double_backward.py and its .md for the formulas).

Given q, k, v, do, the forward's o and lse, and cotangents gq, gk, gv of the backward's (dq, dk, dv), they
return the cotangents (q_bar, k_bar, v_bar, do_bar). P is recomputed block by block from q, k and lse; no
(S x S) tensor exists. Two kernels, as the first-order backward splits dQ from dK/dV:

- the query side (one query block of one query head) loops twice over its key blocks: the first pass
  accumulates the row sums D_bar = -sum_j P dS_bar and R = sum_j P P_bar (the softmax's row sum, written
  with D = rowsum(dO o) so that it needs no O_bar) together with do_bar and the dS gK half of q_bar; the
  second adds S_bar K to q_bar. It stores D, D_bar and R for the key side.
- the key side (one key block of one kv head) loops over the query rows of every query head of its group
  and accumulates k_bar and v_bar (no atomics).

Per block, with scale s: P, dP = dO V^T, dS_bar = s (gQ K^T + Q gK^T), dO gV^T; then
dS = P (dP - D), P_bar = dS_bar (dP - D) + dO gV^T + D_bar dP, S_bar = P (P_bar - R).

Layout as kernels/attention.py: q-like tensors (B, S, Hq, D), k-like (B, S, Hkv, D), all contiguous here;
lse (B, Hq, S) float32 (natural log); the row sums (B, Hq, S) float32. Scores are in base 2 inside.
"""
import torch
import triton
import triton.language as tl

from .._triton import interpreter_on
from .attention_common import LOG2E, LOG2E_FLOAT, block_d, launch, precision, seq_len_of

# (BLOCK_M, BLOCK_N, num_warps, num_stages) per (fp32 inputs, BLOCK_D); BLOCK_M counts query rows and
# BLOCK_N keys on both sides. Each program holds four (rows x D) input tiles, two fp32 accumulators of that
# size and four (BLOCK_M x BLOCK_N) fp32 products, so the tiles are smaller than the first-order kernels'.
# `scripts/compile_kernels.py --ops attention_double_backward` prints registers and spills for sm_90: these
# compile without spills in 16 bits at every head dim and, with Triton 3.8, in fp32 up to D = 64 (3.6: up
# to D = 32); fp32 (the FMA path) spills at D >= 128 (up to 2.4 kB per thread on the query side at D = 256
# with 3.8, 5.8 kB with 3.6), even at the smallest tiles.
DEFAULT_SHAPES = {
    "query": {(False, 16): (64, 32, 8, 2), (False, 32): (64, 32, 8, 2), (False, 64): (64, 32, 8, 2),
              (False, 128): (32, 32, 8, 2), (False, 256): (16, 16, 8, 1),
              (True, 16): (32, 32, 8, 1), (True, 32): (32, 32, 8, 1), (True, 64): (16, 32, 8, 1),
              (True, 128): (16, 16, 8, 1), (True, 256): (16, 16, 8, 1)},
    "key": {(False, 16): (32, 64, 8, 2), (False, 32): (32, 64, 8, 2), (False, 64): (32, 64, 8, 2),
            (False, 128): (32, 32, 8, 2), (False, 256): (16, 32, 8, 1),
            (True, 16): (32, 64, 8, 1), (True, 32): (32, 64, 8, 1), (True, 64): (32, 32, 8, 1),
            (True, 128): (16, 16, 8, 1), (True, 256): (16, 16, 8, 1)},
}


@triton.jit
def _block_terms(b_q, b_gq, b_do, b_lse, b_k, b_gk, b_v, b_gv, b_mask, qk_scale, sm_scale,
                 PRECISION: tl.constexpr):
    """(P, dP, dS_bar, dO gV^T) of one (query block, key block), fp32 (BM, BN); P is 0 where b_mask is False."""
    b_s = tl.dot(b_q, tl.trans(b_k), input_precision=PRECISION) * qk_scale
    b_p = tl.where(b_mask, tl.exp2(b_s - b_lse[:, None]), 0.0)
    b_dp = tl.dot(b_do, tl.trans(b_v), input_precision=PRECISION)
    b_dsb = (tl.dot(b_gq, tl.trans(b_k), input_precision=PRECISION)
             + tl.dot(b_q, tl.trans(b_gk), input_precision=PRECISION)) * sm_scale
    b_dogv = tl.dot(b_do, tl.trans(b_gv), input_precision=PRECISION)
    return b_p, b_dp, b_dsb, b_dogv


@triton.jit
def _key_block(K, GK, V, GV, kv_off, keys, seq_len, mask_d, b_q, b_gq, b_do, b_lse, offs_m, row_ok, qk_scale,
               sm_scale, PRECISION: tl.constexpr):
    """The key block at kv_off (rows `keys`) of K, gK, V, gV, and its _block_terms against the query block
    (causal, rows past seq_len masked)."""
    key_mask = (keys < seq_len)[:, None] & mask_d[None, :]
    b_k = tl.load(K + kv_off, mask=key_mask, other=0.0)
    b_gk = tl.load(GK + kv_off, mask=key_mask, other=0.0)
    b_v = tl.load(V + kv_off, mask=key_mask, other=0.0)
    b_gv = tl.load(GV + kv_off, mask=key_mask, other=0.0)
    b_mask = row_ok[:, None] & (offs_m[:, None] >= keys[None, :])
    b_p, b_dp, b_dsb, b_dogv = _block_terms(b_q, b_gq, b_do, b_lse, b_k, b_gk, b_v, b_gv, b_mask, qk_scale,
                                            sm_scale, PRECISION)
    return b_k, b_gk, b_v, b_gv, b_p, b_dp, b_dsb, b_dogv


@triton.jit
def _s_bar(b_p, b_dp, b_dsb, b_dogv, b_delta, b_dbar, b_r):
    """S_bar = P (P_bar - R), P_bar = dS_bar (dP - D) + dO gV^T + D_bar dP, from the rows' D, D_bar, R."""
    b_pbar = b_dsb * (b_dp - b_delta[:, None]) + b_dogv + b_dbar[:, None] * b_dp
    return b_p * (b_pbar - b_r[:, None])


@triton.jit
def _query_side_kernel(
    Q, GQ, DO, O, K, GK, V, GV, LSE, LENGTHS, QB, DOB, DELTA, DBAR, RSUM,
    stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh, stride_lb, stride_lh, stride_ls,
    S, HQ, qk_scale, sm_scale,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """q_bar and do_bar of one query block, and its rows' D, D_bar, R (zero on padded rows)."""
    i_m = tl.num_programs(0) - 1 - tl.program_id(0)
    i_bh = tl.program_id(1)
    i_b = i_bh // HQ
    i_h = i_bh % HQ
    i_b64 = i_b.to(tl.int64)
    seq_len = seq_len_of(LENGTHS, i_b, 0, S, True)
    start_m = i_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    row_ok = offs_m < seq_len
    row_mask = row_ok[:, None] & mask_d[None, :]
    q_off = i_b64 * stride_qb + i_h * stride_qh + offs_m[:, None] * stride_qs + offs_d[None, :]
    b_q = tl.load(Q + q_off, mask=row_mask, other=0.0)
    b_gq = tl.load(GQ + q_off, mask=row_mask, other=0.0)
    b_do = tl.load(DO + q_off, mask=row_mask, other=0.0)
    b_lse = tl.load(LSE + i_b64 * stride_lb + i_h * stride_lh + offs_m * stride_ls, mask=row_ok, other=0.0) * LOG2E
    b_delta = tl.sum(tl.load(O + q_off, mask=row_mask, other=0.0).to(tl.float32) * b_do.to(tl.float32), 1)
    kv_base = i_b64 * stride_kb + (i_h // GROUP) * stride_kh + offs_n[:, None] * stride_ks + offs_d[None, :]

    b_a = tl.zeros([BLOCK_M], tl.float32)  # sum_j P dS_bar
    b_b = tl.zeros([BLOCK_M], tl.float32)  # sum_j P dS_bar (dP - D)
    b_c = tl.zeros([BLOCK_M], tl.float32)  # sum_j P dO gV^T
    b_qbar = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    b_dobar = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    hi = tl.minimum(start_m + BLOCK_M, seq_len) * (start_m < seq_len).to(tl.int32)
    for start_n in range(0, hi, BLOCK_N):
        b_k, b_gk, b_v, b_gv, b_p, b_dp, b_dsb, b_dogv = _key_block(
            K, GK, V, GV, kv_base + start_n * stride_ks, start_n + offs_n, seq_len, mask_d, b_q, b_gq, b_do, b_lse,
            offs_m, row_ok, qk_scale, sm_scale, PRECISION)
        b_pdsb = b_p * b_dsb
        b_ds = b_p * (b_dp - b_delta[:, None])
        b_a += tl.sum(b_pdsb, 1)
        b_b += tl.sum(b_pdsb * (b_dp - b_delta[:, None]), 1)
        b_c += tl.sum(b_p * b_dogv, 1)
        b_dobar += tl.dot(b_pdsb.to(b_v.dtype), b_v, input_precision=PRECISION)
        b_dobar += tl.dot(b_p.to(b_gv.dtype), b_gv, input_precision=PRECISION)
        b_qbar += tl.dot(b_ds.to(b_gk.dtype), b_gk, input_precision=PRECISION)
    b_dbar = -b_a
    b_r = b_b + b_c + b_dbar * b_delta
    for start_n in range(0, hi, BLOCK_N):
        b_k, b_gk, b_v, b_gv, b_p, b_dp, b_dsb, b_dogv = _key_block(
            K, GK, V, GV, kv_base + start_n * stride_ks, start_n + offs_n, seq_len, mask_d, b_q, b_gq, b_do, b_lse,
            offs_m, row_ok, qk_scale, sm_scale, PRECISION)
        b_sbar = _s_bar(b_p, b_dp, b_dsb, b_dogv, b_delta, b_dbar, b_r)
        b_qbar += tl.dot(b_sbar.to(b_k.dtype), b_k, input_precision=PRECISION)
    b_dobar += b_dbar[:, None] * tl.load(O + q_off, mask=row_mask, other=0.0).to(tl.float32)  # o reloaded
    store_mask = (offs_m[:, None] < S) & mask_d[None, :]
    tl.store(QB + q_off, tl.where(row_ok[:, None], b_qbar * sm_scale, 0.0).to(QB.dtype.element_ty), mask=store_mask)
    tl.store(DOB + q_off, tl.where(row_ok[:, None], b_dobar, 0.0).to(DOB.dtype.element_ty), mask=store_mask)
    row_off = i_bh.to(tl.int64) * S + offs_m
    tl.store(DELTA + row_off, tl.where(row_ok, b_delta, 0.0), mask=offs_m < S)
    tl.store(DBAR + row_off, tl.where(row_ok, b_dbar, 0.0), mask=offs_m < S)
    tl.store(RSUM + row_off, tl.where(row_ok, b_r, 0.0), mask=offs_m < S)


@triton.jit
def _key_side_kernel(
    Q, GQ, DO, K, GK, V, GV, LSE, LENGTHS, DELTA, DBAR, RSUM, KB, VB,
    stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh, stride_lb, stride_lh, stride_ls,
    S, HKV, qk_scale, sm_scale,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """k_bar and v_bar of one key block of one kv head, summed over the query heads of its group."""
    i_n = tl.program_id(0)
    i_bh = tl.program_id(1)
    i_b = i_bh // HKV
    i_hk = i_bh % HKV
    i_b64 = i_b.to(tl.int64)
    seq_len = seq_len_of(LENGTHS, i_b, 0, S, True)
    start_n = i_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    key_ok = offs_n < seq_len
    kv_off = i_b64 * stride_kb + i_hk * stride_kh + offs_n[:, None] * stride_ks + offs_d[None, :]
    kv_mask = key_ok[:, None] & mask_d[None, :]
    b_k = tl.load(K + kv_off, mask=kv_mask, other=0.0)
    b_gk = tl.load(GK + kv_off, mask=kv_mask, other=0.0)
    b_v = tl.load(V + kv_off, mask=kv_mask, other=0.0)
    b_gv = tl.load(GV + kv_off, mask=kv_mask, other=0.0)
    b_kbar = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    b_vbar = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    lo = start_n // BLOCK_M * BLOCK_M  # query rows below the block's first key see none of it
    for g in range(GROUP):
        i_h = i_hk * GROUP + g
        row_base = (i_b64 * HKV * GROUP + i_h) * S
        for start_m in range(lo, seq_len, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            row_ok = offs_m < seq_len
            row_mask = row_ok[:, None] & mask_d[None, :]
            q_off = i_b64 * stride_qb + i_h * stride_qh + offs_m[:, None] * stride_qs + offs_d[None, :]
            b_q = tl.load(Q + q_off, mask=row_mask, other=0.0)
            b_gq = tl.load(GQ + q_off, mask=row_mask, other=0.0)
            b_do = tl.load(DO + q_off, mask=row_mask, other=0.0)
            b_lse = tl.load(LSE + i_b64 * stride_lb + i_h * stride_lh + offs_m * stride_ls, mask=row_ok,
                            other=0.0) * LOG2E
            b_delta = tl.load(DELTA + row_base + offs_m, mask=row_ok, other=0.0)
            b_dbar = tl.load(DBAR + row_base + offs_m, mask=row_ok, other=0.0)
            b_r = tl.load(RSUM + row_base + offs_m, mask=row_ok, other=0.0)
            b_mask = row_ok[:, None] & (offs_m[:, None] >= offs_n[None, :])
            b_p, b_dp, b_dsb, b_dogv = _block_terms(b_q, b_gq, b_do, b_lse, b_k, b_gk, b_v, b_gv, b_mask,
                                                    qk_scale, sm_scale, PRECISION)
            b_ds = b_p * (b_dp - b_delta[:, None])
            b_sbar = _s_bar(b_p, b_dp, b_dsb, b_dogv, b_delta, b_dbar, b_r)
            b_kbar += tl.dot(tl.trans(b_ds.to(b_gq.dtype)), b_gq, input_precision=PRECISION)
            b_kbar += tl.dot(tl.trans(b_sbar.to(b_q.dtype)), b_q, input_precision=PRECISION)
            b_vbar += tl.dot(tl.trans((b_p * (b_dsb + b_dbar[:, None])).to(b_do.dtype)), b_do,
                             input_precision=PRECISION)
    store_mask = (offs_n[:, None] < S) & mask_d[None, :]
    tl.store(KB + kv_off, tl.where(key_ok[:, None], b_kbar * sm_scale, 0.0).to(KB.dtype.element_ty), mask=store_mask)
    tl.store(VB + kv_off, tl.where(key_ok[:, None], b_vbar, 0.0).to(VB.dtype.element_ty), mask=store_mask)


def _shape(side, dtype, D, blocks):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages): `blocks` (BLOCK_M, BLOCK_N) when given, 16 x 16 under the
    interpreter, else the default of this side for the dtype and head dim."""
    if blocks is not None:
        return blocks[0], blocks[1], 4, 1
    if interpreter_on():
        return 16, 16, 4, 1
    return DEFAULT_SHAPES[side][(dtype == torch.float32, block_d(D))]


def attention_double_backward(q, k, v, do, o, lse, lengths, scale, gq, gk, gv, *, blocks=None):
    """(q_bar (B, S, Hq, D), k_bar, v_bar (B, S, Hkv, D), do_bar (B, S, Hq, D)) in the inputs' dtype.

    q, do, o, gq (B, S, Hq, D) and k, v, gk, gv (B, S, Hkv, D) of one dtype (the caller checks: the op in
    gradmem_fast/ops/attention_double_backward.py); o the forward's output and lse (B, Hq, S) float32 its row
    log-sum-exp (natural log); lengths (B,) int32 contiguous, valid rows per sample; blocks (BLOCK_M,
    BLOCK_N) overrides the tiles of both kernels (tests)."""
    q, gq, do, o = (t.contiguous() for t in (q, gq, do, o))
    k, gk, v, gv = (t.contiguous() for t in (k, gk, v, gv))
    lse = lse.contiguous()
    B, S, Hq, D = q.shape
    Hkv = k.shape[2]
    q_bar, do_bar = torch.empty_like(q), torch.empty_like(do)
    k_bar, v_bar = torch.empty_like(k), torch.empty_like(v)
    if B * Hq * S == 0:
        return q_bar.zero_(), k_bar.zero_(), v_bar.zero_(), do_bar.zero_()
    rows = [torch.empty((B, Hq, S), dtype=torch.float32, device=q.device) for _ in range(3)]  # D, D_bar, R
    common = dict(GROUP=Hq // Hkv, HEAD_DIM=D, BLOCK_D=block_d(D), PRECISION=precision(q.dtype))
    strides = [*q.stride()[:3], *k.stride()[:3], *lse.stride()]
    bm, bn, w, st = _shape("query", q.dtype, D, blocks)
    launch(_query_side_kernel, lambda nb: (triton.cdiv(S, bm), nb * Hq), B, Hq,
           [q, gq, do, o, k, gk, v, gv, lse, lengths, q_bar, do_bar, *rows, *strides, S, Hq, scale * LOG2E_FLOAT,
            scale], dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=st, **common))
    bm, bn, w, st = _shape("key", q.dtype, D, blocks)
    launch(_key_side_kernel, lambda nb: (triton.cdiv(S, bn), nb * Hkv), B, Hkv,
           [q, gq, do, k, gk, v, gv, lse, lengths, *rows, k_bar, v_bar, *strides, S, Hkv, scale * LOG2E_FLOAT,
            scale], dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=st, **common))
    return q_bar, k_bar, v_bar, do_bar
