"""What the attention kernels (kernels/attention.py, kernels/attention_layer0.py) share: constants,
autotuning candidates and per-(dtype, head dim) defaults, the autotuner helpers, the @triton.jit
helpers both kernel files call (valid rows, one online-softmax step, the dK/dV loop over query rows)
and the host launch helpers (batch split, 32-bit span check).

Head dims are multiples of 16 up to MAX_HEAD_DIM; BLOCK_D, the head dim rounded up to a power of two,
keys the default tables.
"""
import os

import torch
import triton
import triton.language as tl

from .._triton import interpreter_on
from .device import on_device
from .precision import dot_precision

# log2(e): a host float (the launchers scale scores into base 2) and the kernels' constexpr; ln(2)
LOG2E_FLOAT = 1.4426950408889634
LOG2E = tl.constexpr(LOG2E_FLOAT)
LN2 = tl.constexpr(0.6931471805599453)
MAX_GRID_Y = 65535
# the largest head dim the default tables hold a tile for (gradmem_fast/ops/attention.py refuses more)
MAX_HEAD_DIM = 256
# the kernels address one sample of one tensor with 32-bit offsets
MAX_SAMPLE_SPAN = 2 ** 31

# Autotuning candidates (BLOCK_M, BLOCK_N, num_warps, num_stages), the first one the 16-bit default at
# D <= 64; BLOCK_N of the dK/dV kernel is a multiple of its BLOCK_M.
FWD_SHAPES = [(128, 64, 8, 3), (128, 64, 4, 3), (64, 64, 4, 3), (128, 32, 4, 4), (64, 32, 4, 4)]
DKDV_SHAPES = [(32, 128, 8, 3), (32, 64, 4, 3), (64, 64, 8, 3), (32, 64, 8, 2)]
DQ_SHAPES = [(128, 64, 8, 3), (128, 32, 4, 3), (64, 64, 4, 3), (64, 32, 4, 3)]
# The candidates at BLOCK_D = 256 (Gemma 3), the first one the 16-bit default: most of the lists above
# spill registers there or exceed sm_90's shared memory; each of these compiles for sm_90 without
# spills in fp16 and bf16 (`scripts/compile_kernels.py --head-dims 256`), as do the fp32 tiles that
# `tile_prune` takes from them. The dK/dV kernel holds fp32 dK, dV and its K, V tiles in registers
# across its loop: its larger tiles spill with a second stage.
FWD_SHAPES_256 = [(128, 64, 8, 2), (128, 32, 8, 3), (128, 32, 8, 2), (64, 64, 8, 2), (64, 32, 8, 3), (64, 32, 4, 4)]
DKDV_SHAPES_256 = [(32, 64, 8, 1), (16, 64, 8, 1), (32, 32, 8, 1), (16, 32, 8, 2), (16, 32, 8, 1)]
DQ_SHAPES_256 = [(128, 32, 8, 2), (64, 64, 8, 2), (64, 32, 8, 3), (64, 32, 8, 2), (32, 32, 4, 2)]

# The one config GRADMEM_FAST_AUTOTUNE=0 launches, per kernel and (fp32 inputs, BLOCK_D): large tiles
# without register spills on sm_90 (`scripts/compile_kernels.py --autotune 0` lists them). IEEE fp32
# dots run on the FMA units with both operands in registers, so fp32 takes much smaller tiles, fewer
# stages at D = 128, 16 x 16 tiles for dQ and dK/dV at D = 256, and autotunes only over its default
# and smaller tiles (`tile_prune`).
_BF = (128, 64, 8, 3)
DEFAULT_SHAPES = {
    "fwd": {(False, 16): _BF, (False, 32): _BF, (False, 64): _BF, (False, 128): _BF,
            (False, 256): FWD_SHAPES_256[0],
            (True, 16): (64, 32, 8, 2), (True, 32): (64, 32, 8, 2), (True, 64): (64, 32, 8, 2),
            (True, 128): (32, 16, 8, 2), (True, 256): (32, 16, 8, 2)},
    "dkdv": {(False, 16): (32, 128, 8, 3), (False, 32): (32, 128, 8, 3), (False, 64): (32, 128, 8, 3),
             (False, 128): (32, 64, 8, 2), (False, 256): DKDV_SHAPES_256[0],
             (True, 16): (16, 32, 4, 2), (True, 32): (16, 32, 4, 2), (True, 64): (16, 32, 8, 2),
             (True, 128): (16, 32, 8, 1), (True, 256): (16, 16, 8, 1)},
    "dq": {(False, 16): _BF, (False, 32): _BF, (False, 64): _BF, (False, 128): (64, 64, 4, 3),
           (False, 256): DQ_SHAPES_256[0],
           (True, 16): (64, 32, 8, 2), (True, 32): (64, 32, 8, 2), (True, 64): (64, 32, 8, 2),
           (True, 128): (32, 16, 4, 2), (True, 256): (16, 16, 4, 2)},
}


def autotune_on():
    return os.environ.get("GRADMEM_FAST_AUTOTUNE", "1") != "0"


def configs(shapes):
    """Autotuning candidates: under the interpreter one tiny config, else every shape whatever
    GRADMEM_FAST_AUTOTUNE says (with it 0 the launchers bypass the autotuner with `default_shape`).
    Triton runs a one-config autotuner without pruning, so a list collapsed at import would launch
    its one tile on every dtype and head dim once the switch is turned on."""
    if interpreter_on():
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=4, num_stages=1)]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s) for bm, bn, w, s in shapes]


def default_shape(table, dtype, D):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) that GRADMEM_FAST_AUTOTUNE=0 uses for this dtype and D."""
    return table[(dtype == torch.float32, block_d(D))]


precision = dot_precision


def tile_prune(table, shapes, shapes_256):
    """Autotuner `early_config_prune` by the inputs' dtype and head dim: the default of `table` for
    (fp32, BLOCK_D) first, then the candidates listed for that head dim (`shapes_256` at BLOCK_D = 256,
    else `shapes`): for fp32 only the smaller tiles (the 16-bit candidates spill registers on the FMA
    path, take minutes to compile, and some exceed shared memory at D = 128), for 16-bit inputs the
    others (the autotuner skips one that exceeds shared memory when it times it)."""
    def shape(c):
        return c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages

    def prune(configs, nargs, **kwargs):
        fp32 = next(v.dtype for v in nargs.values() if isinstance(v, torch.Tensor)) == torch.float32
        bm, bn, w, st = table[(fp32, kwargs["BLOCK_D"])]
        default = triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=st)
        listed = set(shapes_256 if kwargs["BLOCK_D"] == 256 else shapes)
        if fp32:
            rest = [c for c in configs if shape(c) in listed and c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] < bm * bn]
        else:
            rest = [c for c in configs if shape(c) in listed and shape(c) != (bm, bn, w, st)]
        return [default] + rest
    return prune


def autotuned(kernel, key, table, shapes, shapes_256):
    """`kernel` under triton.autotune over `shapes` and `shapes_256`, pruned by `tile_prune`."""
    every = shapes + [s for s in shapes_256 if s not in shapes]
    return triton.autotune(configs(every), key=key,
                           prune_configs_by={"early_config_prune": tile_prune(table, shapes, shapes_256)})(kernel)


def block_d(D):
    """The head dim rounded up to a power of two, at least 16: the kernels' BLOCK_D."""
    if D > MAX_HEAD_DIM:
        raise ValueError(f"head dim {D}: the attention kernels take head dims up to {MAX_HEAD_DIM}")
    return max(16, triton.next_power_of_2(D))


@triton.jit
def seq_len_of(LENGTHS, i_b, len_offset, S, HAS_LENGTHS: tl.constexpr):
    """Valid rows of sample i_b: lengths[i_b] + len_offset clamped to [0, S] (S without lengths)."""
    if HAS_LENGTHS:
        n = tl.load(LENGTHS + i_b) + len_offset
        n = tl.minimum(tl.maximum(n, 0), S)
    else:
        n = i_b * 0 + S
    return n


@triton.jit
def online_softmax_step(b_s, b_v, b_m, b_l, b_acc, PRECISION: tl.constexpr):
    """Folds one key block (scores b_s (BM, BN), base 2, masked to -inf) into the running max b_m,
    sum b_l and un-normalised accumulator b_acc (BM, BD)."""
    b_m_new = tl.maximum(b_m, tl.max(b_s, 1))
    b_alpha = tl.exp2(b_m - b_m_new)
    b_p = tl.exp2(b_s - b_m_new[:, None])
    b_l = b_l * b_alpha + tl.sum(b_p, 1)
    b_acc = b_acc * b_alpha[:, None] + tl.dot(b_p.to(b_v.dtype), b_v, input_precision=PRECISION)
    return b_m_new, b_l, b_acc


@triton.jit
def dkdv_loop(b_dk, b_dv, b_k, b_v, p_q, p_do, p_lse, p_delta, stride_qs, stride_dos, stride_ls,
              offs_n, lo, hi, n_rows, qk_scale,
              CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
              PRECISION: tl.constexpr):
    """Adds to b_dk, b_dv (BN, BD) fp32 the contributions of query rows [lo, hi) (rows >= n_rows are
    padding: loaded as zeros, with delta 0 they contribute nothing). CAUSAL masks key > row."""
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        row_ok = offs_m < n_rows
        b_q = tl.load(p_q + offs_m[:, None] * stride_qs + offs_d[None, :], mask=row_ok[:, None] & mask_d[None, :],
                      other=0.0)
        b_do = tl.load(p_do + offs_m[:, None] * stride_dos + offs_d[None, :],
                       mask=row_ok[:, None] & mask_d[None, :], other=0.0)
        b_lse = tl.load(p_lse + offs_m * stride_ls, mask=row_ok, other=0.0) * LOG2E
        b_delta = tl.load(p_delta + offs_m, mask=row_ok, other=0.0)
        b_s = tl.dot(b_q, tl.trans(b_k), input_precision=PRECISION) * qk_scale
        b_p = tl.exp2(b_s - b_lse[:, None])
        if CAUSAL:
            b_p = tl.where(offs_m[:, None] >= offs_n[None, :], b_p, 0.0)
        b_dv += tl.dot(tl.trans(b_p.to(b_do.dtype)), b_do, input_precision=PRECISION)
        b_dp = tl.dot(b_do, tl.trans(b_v), input_precision=PRECISION)
        b_ds = b_p * (b_dp - b_delta[:, None])
        b_dk += tl.dot(tl.trans(b_ds.to(b_q.dtype)), b_q, input_precision=PRECISION)
    return b_dk, b_dv


# ---------------------------------------------------------------- launch helpers


def strides3(t):
    return t.stride(0), t.stride(1), t.stride(2)


def pick(tuned, raw, blocks, default):
    """The kernel and its launch options: fixed (BLOCK_M, BLOCK_N) when `blocks` is given, else the
    autotuner, or with GRADMEM_FAST_AUTOTUNE=0 (interpreter off) the raw kernel with `default`
    (BLOCK_M, BLOCK_N, num_warps, num_stages)."""
    if blocks is not None:
        return raw, {"BLOCK_M": blocks[0], "BLOCK_N": blocks[1], "num_warps": 4,
                     "num_stages": 1 if interpreter_on() else 2}
    if interpreter_on() or autotune_on():
        return tuned, {}
    bm, bn, w, st = default
    return raw, {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": w, "num_stages": st}


def sample_span(t):
    """Elements one sample (index along dim 0) of t spans."""
    return 1 + sum((n - 1) * abs(st) for n, st in zip(t.shape[1:], t.stride()[1:]))


def batch_ranges(B, heads):
    """[b0, b1) pieces of the batch whose grids (., (b1 - b0) * heads) fit CUDA's y limit."""
    if heads > MAX_GRID_Y:
        raise ValueError(f"{heads} heads: the grid's second dimension is limited to {MAX_GRID_Y}")
    step = MAX_GRID_Y // heads
    return [(b0, min(B, b0 + step)) for b0 in range(0, B, step)]


def launch(kernel, grid, B, heads, args, kwargs):
    """kernel[grid(nb)](*args) over pieces of the batch; every tensor in args is (B, ...) and is
    addressed per sample with 32-bit offsets."""
    for a in args:
        if isinstance(a, torch.Tensor) and sample_span(a) >= MAX_SAMPLE_SPAN:
            raise ValueError(f"a {tuple(a.shape)} tensor with strides {a.stride()} spans {sample_span(a)} elements "
                             f"per sample; the attention kernels address a sample with 32-bit offsets")
    with on_device(args[0]):
        for b0, b1 in batch_ranges(B, heads):
            part = args if (b0, b1) == (0, B) else [a[b0:b1] if isinstance(a, torch.Tensor) else a for a in args]
            kernel[grid(b1 - b0)](*part, **kwargs)

