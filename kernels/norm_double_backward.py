"""Triton kernel and host launcher for the double backward of the row norms: RMSNorm / LayerNorm of add + norm
and the grouped q/k RMS norm (derivation: gradmem_fast/ops/norm_double_backward.md).

Rows are (n, g) pairs of (N, G, D) views with D contiguous; row (n, g) uses weight row g (add + norm: G = 1).
One program per (block of BLOCK_R rows of one group) x N_ITER consecutive blocks, grid (programs, G): it
recomputes each row's statistics from h in fp32 registers, forms the cotangents of dy and h of
<g_dx, dx(dy, h, w)> and writes them in the inputs' dtypes, and sums its rows' weight contribution
g_bar * dy into one fp32 row of a (programs, G, D) buffer, which the host sums over programs: no atomics, so
the result is deterministic. Rows up to MAX_D = 8192 long (BLOCK_D = the next power of two, one chunk).
"""
import torch
import triton
import triton.language as tl

from gradmem_fast._triton import interpreter_on

from .device import on_device

MAX_D = 8192
MAX_GROUPS = 65535  # the grid's second dimension
# programs per launch (all groups together) the row blocks are spread over on a GPU: enough warps in flight for
# a memory-bound kernel, few enough that the fp32 partial weight sums stay small next to the inputs
_TARGET_PROGRAMS, _MIN_ROWS_PER_PROGRAM = 1024, 8
# under the interpreter: small row blocks and few programs, so tiny test shapes run several blocks per program
_INTERPRETER_BLOCK_R, _INTERPRETER_PROGRAMS_PER_GROUP = 4, 3


@triton.jit
def _norm_double_backward_kernel(p_dy, p_h, p_w, p_u, p_dy_bar, p_h_bar, p_w_part, N, G, D, eps, N_ITER,
                                 stride_dyn, stride_dyg, stride_hn, stride_hg, stride_un, stride_ug,
                                 IS_LAYER: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    # p_dy, p_h, p_u: (N, G, D) inputs (dy, h, the cotangent u of dx), D contiguous; p_w (G, D) contiguous;
    # p_dy_bar, p_h_bar: (N, G, D) contiguous outputs; p_w_part: (programs, G, D) fp32
    i_p = tl.program_id(0)
    o_g64 = tl.program_id(1).to(tl.int64)  # the group (weight row)
    o_d = tl.arange(0, BLOCK_D)
    m_d = o_d < D
    b_w = tl.load(p_w + o_g64 * D + o_d, mask=m_d, other=0.0).to(tl.float32)
    b_wacc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for i_it in range(0, N_ITER):
        o_n = (i_p * N_ITER + i_it) * BLOCK_R + tl.arange(0, BLOCK_R)
        m_n = o_n < N
        o_n64 = o_n.to(tl.int64)
        m_rd = m_n[:, None] & m_d[None, :]
        b_h = tl.load(p_h + o_n64[:, None] * stride_hn + o_g64 * stride_hg + o_d[None, :], mask=m_rd,
                      other=0.0).to(tl.float32)
        if IS_LAYER:  # the RMS rule on the centred rows (padding kept at zero)
            b_mean = tl.sum(b_h, axis=1) / D
            b_h = tl.where(m_rd, b_h - b_mean[:, None], 0.0)
        b_r = 1.0 / tl.sqrt(tl.sum(b_h * b_h, axis=1) / D + eps)
        b_xhat = b_h * b_r[:, None]
        b_dy = tl.load(p_dy + o_n64[:, None] * stride_dyn + o_g64 * stride_dyg + o_d[None, :], mask=m_rd,
                       other=0.0).to(tl.float32)
        b_u = tl.load(p_u + o_n64[:, None] * stride_un + o_g64 * stride_ug + o_d[None, :], mask=m_rd,
                      other=0.0).to(tl.float32)
        b_g = b_dy * b_w[None, :]
        b_a = tl.sum(b_u * b_xhat, axis=1) / D
        b_b = tl.sum(b_u * b_g, axis=1) / D
        b_c = tl.sum(b_g * b_xhat, axis=1) / D
        b_r2 = b_r * b_r
        b_gbar = b_r[:, None] * (b_u - b_a[:, None] * b_xhat)
        b_hbar = -b_r2[:, None] * (b_c[:, None] * b_u + b_a[:, None] * b_g
                                   + (b_b - 3.0 * b_a * b_c)[:, None] * b_xhat)
        if IS_LAYER:  # the terms of -r <g>, then the adjoint of the centring
            b_umean = tl.sum(b_u, axis=1) / D
            b_gmean = tl.sum(b_g, axis=1) / D
            b_gbar = b_gbar - (b_r * b_umean)[:, None]
            b_hbar = b_hbar + (b_r2 * b_gmean * b_umean)[:, None] * b_xhat
            b_hbar = b_hbar - (tl.sum(b_hbar, axis=1) / D)[:, None]  # padding of b_hbar is 0 before this
        o_out = (o_n64[:, None] * G + o_g64) * D + o_d[None, :]
        tl.store(p_dy_bar + o_out, (b_gbar * b_w[None, :]).to(p_dy_bar.dtype.element_ty), mask=m_rd)
        tl.store(p_h_bar + o_out, b_hbar.to(p_h_bar.dtype.element_ty), mask=m_rd)
        b_wacc += tl.sum(b_gbar * b_dy, axis=0)  # rows and columns out of range have dy = 0
    tl.store(p_w_part + (i_p.to(tl.int64) * G + o_g64) * D + o_d, b_wacc, mask=m_d)


def launch_config(N, G, D):
    """(BLOCK_R, BLOCK_D, num_warps, N_ITER, programs) for N rows per group of G groups of length D.

    BLOCK_D is the next power of two of D; a warp per 256 columns, 4 to 16 warps; BLOCK_R rows so that each
    thread holds 8 elements of each (BLOCK_R, BLOCK_D) tile (16 at D > 4096), no spills on sm_90. The
    row blocks of a group spread over about _TARGET_PROGRAMS / G programs of N_ITER consecutive blocks, at
    least _MIN_ROWS_PER_PROGRAM rows each (the partial weight sums: at most 1/8 of one fp32 copy of the rows)."""
    if D > MAX_D:
        raise ValueError(f"row length {D} is over the kernel's maximum {MAX_D}")
    block_d = triton.next_power_of_2(D)
    if interpreter_on():
        block_r, warps = min(_INTERPRETER_BLOCK_R, max(1, 256 // block_d)), 1
        per_group, min_rows = _INTERPRETER_PROGRAMS_PER_GROUP, 1
    else:
        warps = min(16, max(4, block_d // 256))
        block_r = max(1, 8 * 32 * warps // block_d)
        per_group, min_rows = max(1, _TARGET_PROGRAMS // G), _MIN_ROWS_PER_PROGRAM
    n_blocks = triton.cdiv(N, block_r)
    n_iter = min(n_blocks, max(triton.cdiv(n_blocks, per_group), triton.cdiv(min_rows, block_r)))
    return block_r, block_d, warps, n_iter, triton.cdiv(n_blocks, n_iter)


def _rows3(t, G, D):
    """t (..., G, D) or (rows, D) (G = 1) as an (N, G, D) view with D contiguous, or a contiguous copy."""
    if t.stride(-1) == 1 or D == 1:
        try:
            return t.view(-1, G, D)
        except RuntimeError:
            pass
    return t.contiguous().view(-1, G, D)


def norm_double_backward(dy, h, weight, g_dx, eps, is_layer):
    """(dy_bar, h_bar, weight_bar) of the norm's double backward; no checks, no autograd.

    dy, h, g_dx: (..., D) rows of one norm with weight (D,) (add + norm, kind "rms" or, with is_layer,
    "layer"), or (..., G, D) rows of the q/k RMS norm with weight (G, D) (is_layer False); any strides (read
    in place where the rows form an (N, G, D) view with D contiguous, else copied). dy_bar (dy's dtype) and
    h_bar (h's dtype) are new contiguous tensors of h's shape; weight_bar is float32 of weight's shape.
    Extra memory: programs x G x D floats of partial weight sums (launch_config)."""
    D = h.shape[-1]
    G = weight.shape[0] if weight.dim() == 2 else 1
    dy_bar = torch.empty(h.shape, dtype=dy.dtype, device=h.device)
    h_bar = torch.empty(h.shape, dtype=h.dtype, device=h.device)
    N = h.numel() // (G * D) if D else 0
    if N == 0:
        return dy_bar, h_bar, torch.zeros(weight.shape, dtype=torch.float32, device=h.device)
    if G > MAX_GROUPS:
        raise ValueError(f"{G} groups are over the kernel's maximum {MAX_GROUPS} (the grid's second dimension)")
    dy3, h3, u3 = _rows3(dy, G, D), _rows3(h, G, D), _rows3(g_dx, G, D)
    block_r, block_d, warps, n_iter, programs = launch_config(N, G, D)
    with on_device(h):
        w_part = torch.empty(programs, G, D, dtype=torch.float32, device=h.device)
        _norm_double_backward_kernel[(programs, G)](
            dy3, h3, weight.contiguous(), u3, dy_bar, h_bar, w_part, N, G, D, float(eps), n_iter,
            dy3.stride(0), dy3.stride(1), h3.stride(0), h3.stride(1), u3.stride(0), u3.stride(1),
            IS_LAYER=bool(is_layer), BLOCK_R=block_r, BLOCK_D=block_d, num_warps=warps)
        return dy_bar, h_bar, w_part.sum(0).view(weight.shape)
