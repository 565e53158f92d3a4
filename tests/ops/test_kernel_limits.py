"""What the Triton interpreter cannot check, checked on CPU without launching anything: the launchers
run on meta tensors (no data, so any host read of a tensor value raises) with the GPU block sizes, and
each kernel launch is recorded instead of run. Grids must fit CUDA's limits at the standard shapes of
PERFORMANCE.md and at the documented limits, per-sample spans must fit the kernels' 32-bit offsets,
fp32 dots must be true fp32 unless torch allows TF32, and GRADMEM_FAST_AUTOTUNE=0 must launch the
documented per-dtype default. GPU-marked tests run the same paths on the card."""
import re
from pathlib import Path

import pytest
import torch

from helpers import rel_err

pytestmark = pytest.mark.needs_triton  # every kernel test here launches Triton (interpreter or GPU)

MAX_GRID = (2 ** 31 - 1, 65535, 65535)
KERNELS = Path(__file__).resolve().parents[2] / "kernels"
META = "meta"


def _name(k):
    while hasattr(k, "fn"):
        k = k.fn
    return k.__name__


class Launch:
    def __init__(self, name, grid, args, kwargs):
        self.name, self.grid, self.args, self.kwargs = name, tuple(grid) + (1,) * (3 - len(grid)), args, kwargs

    def tensors(self):
        return [a for a in self.args if isinstance(a, torch.Tensor)]


@pytest.fixture
def launches(monkeypatch):
    """Records every kernel launch (once per autotuning config) with its resolved grid; the
    launchers take their GPU paths (interpreter off for their choices)."""
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    # imported before the interpreter switch goes off below: jit decides at import time
    from gradmem_fast.kernels import attention as A, attention_layer0, head_loss  # noqa: F401

    seen = []

    def resolve(grid, kwargs):
        return grid(kwargs) if callable(grid) else grid

    def run_raw(self, *args, grid, warmup=False, **kwargs):
        seen.append(Launch(_name(self), resolve(grid, kwargs), args, kwargs))

    def run_tuned(self, *args, grid=None, warmup=False, **kwargs):
        self.nargs = dict(zip(self.arg_names, args))
        for config in self.prune_configs(kwargs):
            kw = {**kwargs, **config.all_kwargs()}
            seen.append(Launch(_name(self), resolve(grid, kw), args, kw))

    for kind in {type(A._fwd_kernel), JITFunction}:
        monkeypatch.setattr(kind, "run", run_raw)
    monkeypatch.setattr(Autotuner, "run", run_tuned)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    return seen


def meta(*shape, dtype=torch.bfloat16):
    return torch.empty(shape, dtype=dtype, device=META)


def run_attention(B, S, Hq, Hkv, D, dtype, m=16):
    """Every attention launcher the write engine calls, at (B, S = m + T) rows."""
    from gradmem_fast.kernels import attention as A, attention_layer0 as L0

    T = S - m
    # q, k, v as views of one fused projection output, as the engine lays them out
    qkv = meta(B, S, Hq + 2 * Hkv, D, dtype=dtype)
    q, k, v = qkv[:, :, :Hq], qkv[:, :, Hq:Hq + Hkv], qkv[:, :, Hq + Hkv:]
    do = meta(B, S, Hq, D, dtype=dtype)
    lengths = meta(B, dtype=torch.int32)
    o, lse = A.attention_forward(q, k, v, lengths, D ** -0.5)
    A.attention_backward(do, q, k, v, o, lse, lengths, D ** -0.5)
    state = A.context_attention_state(q[:, m:], k[:, m:], v[:, m:], lengths, D ** -0.5)
    o, lse = L0.memory_attention_forward(q[:, :m], k[:, :m], v[:, :m], q[:, m:], state, lengths, D ** -0.5)
    L0.memory_attention_backward(do, q[:, :m], k[:, :m], v[:, :m], q[:, m:], o, lse, lengths, D ** -0.5)


def run_head_loss(N, d, V, dtype, method):
    from gradmem_fast.kernels.head_loss import head_loss

    head_loss(meta(N, d, dtype=dtype), meta(V, d, dtype=dtype), meta(N, dtype=torch.int64),
              meta(N, dtype=torch.float32), meta(N, dtype=torch.float32), meta(N, d, dtype=dtype), method=method)


# (B, S, Hq, Hkv, D, dtype): gpt2-batch, llama1b-batch, kv-paper, head dim 128, the largest head dim
# (Gemma 3's 256), and a batch whose B * Hq passes the grid's 65535 (the launchers split it)
ATTENTION_SHAPES = [
    (16, 1024, 12, 12, 64, torch.bfloat16),
    (8, 2064, 32, 8, 64, torch.bfloat16),
    (64, 905, 4, 4, 32, torch.float32),
    (8, 2064, 32, 8, 128, torch.float16),
    (4, 2064, 8, 4, 256, torch.bfloat16),
    (4100, 144, 32, 8, 64, torch.bfloat16),
]
# (N, d, V): gpt2-batch, llama1b-batch, the documented limits V 256k, d 4096
HEAD_SHAPES = [(16 * 1024, 768, 50257), (8 * 2048, 2048, 128256), (16 * 1024, 4096, 256 * 1024)]


def _check_grids(launches):
    assert launches
    for launch in launches:
        assert all(0 < g <= limit for g, limit in zip(launch.grid, MAX_GRID)), (launch.name, launch.grid)


@pytest.mark.parametrize("autotune", ["1", "0"])
@pytest.mark.parametrize("B, S, Hq, Hkv, D, dtype", ATTENTION_SHAPES)
def test_attention_grids_fit_and_cover_the_batch(launches, monkeypatch, autotune, B, S, Hq, Hkv, D, dtype):
    monkeypatch.setenv("GRADMEM_FAST_AUTOTUNE", autotune)
    run_attention(B, S, Hq, Hkv, D, dtype)
    _check_grids(launches)
    for launch in launches:
        heads = Hkv if "dkdv" in launch.name else Hq
        batch = {t.shape[0] for t in launch.tensors()}
        assert len(batch) == 1 and launch.grid[1] == batch.pop() * heads, launch.name
    # every sample is launched exactly once per kernel (and autotuning config)
    per_kernel = {}
    for launch in launches:
        # one launcher call: the same scalars (strides, sizes, offsets) and constexprs
        key = (launch.name, tuple(a for a in launch.args if not isinstance(a, torch.Tensor)),
               tuple(sorted(launch.kwargs.items())))
        per_kernel[key] = per_kernel.get(key, 0) + launch.tensors()[0].shape[0]
    assert set(per_kernel.values()) == {B}
    assert len(launches) > len(per_kernel) or B * Hq <= MAX_GRID[1]


@pytest.mark.parametrize("method", ["chunked", "fused"])
@pytest.mark.parametrize("N, d, V", HEAD_SHAPES)
def test_head_loss_grids_fit(launches, method, N, d, V):
    run_head_loss(N, d, V, torch.bfloat16, method)
    _check_grids(launches)
    if method == "chunked":
        from gradmem_fast.kernels.head_loss import chunk_rows_for

        rows = chunk_rows_for(N, V, torch.bfloat16)
        assert [launch.grid[0] for launch in launches] == [min(rows, N - s) for s in range(0, N, rows)]


def test_attention_sample_span_beyond_32_bits_is_refused(launches):
    from gradmem_fast.kernels import attention as A

    # one sample of q spans 2**31 elements: the kernels' 32-bit in-sample offsets would wrap
    q = meta(1, 2 ** 21, 16, 64)
    with pytest.raises(ValueError, match="32-bit"):
        A.attention_forward(q, q, q, meta(1, dtype=torch.int32), 0.125)
    assert not launches
    A.attention_forward(q[:, : 2 ** 21 - 1], q[:, : 2 ** 21 - 1], q[:, : 2 ** 21 - 1], meta(1, dtype=torch.int32),
                        0.125)
    assert launches


@pytest.mark.parametrize("D, why", [(16, None), (48, None), (128, None), (256, None),
                                    (24, "head dim 24"), (272, "head dim 272"), (512, "head dim 512")])
def test_attention_kernels_take_head_dims_up_to_256(D, why):
    """Multiples of 16 up to 256 (Gemma 3's head dim) take the kernels; wider or unaligned heads are
    refused with the head dim and the limit in the reason, and the launchers refuse them too."""
    from gradmem_fast.kernels import attention_common as C
    from gradmem_fast.ops import attention as ops

    q = torch.empty(1, 4, 2, D)  # CPU under the interpreter: only the head dim decides
    reason = ops.kernel_reason(q, q[:, :, :1], q[:, :, 1:])
    if why is None:
        assert reason is None
        assert C.block_d(D) in {bd for _, bd in C.DEFAULT_SHAPES["fwd"]}
    else:
        assert why in reason and "multiples of 16 up to 256" in reason
        with pytest.raises(RuntimeError, match=why):
            ops.attention_forward(q, q[:, :, :1], q[:, :, 1:], torch.full((1,), 4, dtype=torch.int32), 0.125,
                                  backend="kernel")
    if D > 256:
        with pytest.raises(ValueError, match=f"head dim {D}"):
            C.block_d(D)


def _source(name):
    """The @triton.jit functions of a kernel module (host code multiplies Python ints)."""
    text = (KERNELS / name).read_text()
    return "\n".join(re.findall(r"@triton\.jit\n.*?(?=\n\n\n|\Z)", text, flags=re.S))


def _products(source, right):
    """(left, right) operands of every `left * right` in source, left a name, a call or a parenthesis."""
    left = r"(\([^()]*\)|[\w.]+(?:\([\w.]*\))?(?:\[[^\]]*\])?)"
    return re.findall(left + r" \* (" + right + r")", source)


@pytest.mark.parametrize("name", ["attention.py", "attention_layer0.py"])
def test_attention_batch_offsets_are_64_bit(name):
    """Offsets across samples can pass 2**31 (B * S * H * D): each batch stride and each per-(b, h) row
    count is multiplied by an int64 value."""
    products = _products(_source(name), r"stride_\w*b\b|S\b|\(M \+ T\)|stride_delta\b")
    assert products
    for left, right in products:
        assert "64" in left, f"{left} * {right}"


def test_head_loss_row_offsets_are_64_bit():
    products = _products(_source("head_loss.py"), r"stride_\w+|D\b")
    assert products
    for left, right in products:
        assert "64" in left, f"{left} * {right}"


@pytest.mark.parametrize("fp32_precision, expected", [("ieee", "ieee"), ("tf32", "tf32"), ("none", "ieee")])
def test_fp32_dot_precision_follows_torch(launches, monkeypatch, fp32_precision, expected):
    matmul = torch.backends.cuda.matmul
    previous = matmul.fp32_precision
    try:
        # the new API: reading the legacy allow_tf32 afterwards raises, the launchers must not
        matmul.fp32_precision = fp32_precision
        run_attention(2, 80, 4, 2, 32, torch.float32)
        run_head_loss(64, 128, 70, torch.float32, "fused")
    finally:
        matmul.fp32_precision = previous
    with_dots = [launch for launch in launches if "PRECISION" in launch.kwargs]
    assert {launch.name for launch in with_dots} >= {"_fwd_kernel", "_bwd_dkdv_kernel", "_bwd_dq_kernel",
                                                     "_ctx_fwd_kernel", "_mem_dkdv_kernel", "_fused_head_loss_kernel"}
    assert {launch.kwargs["PRECISION"] for launch in with_dots} == {expected}


def test_fp32_dot_precision_legacy_switch(launches):
    # set and reset by hand: some torch versions (2.11) refuse to read allow_tf32 back, which monkeypatch does
    matmul = torch.backends.cuda.matmul
    matmul.allow_tf32 = True
    try:
        run_attention(2, 80, 4, 2, 32, torch.float32)
    finally:
        matmul.allow_tf32 = False  # the default
    assert {launch.kwargs["PRECISION"] for launch in launches if "PRECISION" in launch.kwargs} == {"tf32"}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("D", [32, 64, 128, 256])
def test_autotune_off_launches_the_per_dtype_default(launches, monkeypatch, dtype, D):
    from gradmem_fast.kernels import attention_common as C, attention_layer0 as L0

    monkeypatch.setenv("GRADMEM_FAST_AUTOTUNE", "0")
    run_attention(2, 272, 8, 2, D, dtype)
    tables = {"_fwd_kernel": C.DEFAULT_SHAPES["fwd"], "_bwd_dkdv_kernel": C.DEFAULT_SHAPES["dkdv"],
              "_bwd_dq_kernel": C.DEFAULT_SHAPES["dq"], "_ctx_fwd_kernel": L0.DEFAULT_SHAPES["ctx"],
              "_mem_dkdv_kernel": L0.DEFAULT_SHAPES["mem_dkdv"]}
    seen = set()
    for launch in launches:
        if launch.name not in tables:
            continue
        seen.add(launch.name)
        bm, bn, warps, stages = tables[launch.name][(dtype == torch.float32, C.block_d(D))]
        kw = launch.kwargs
        assert (kw["BLOCK_M"], kw["BLOCK_N"], kw["num_warps"], kw["num_stages"]) == (bm, bn, warps, stages)
    assert seen == set(tables)


def test_default_shapes_are_valid_tiles():
    """Dots need every tile side >= 16; the dK/dV kernels step query rows by BLOCK_M inside a key block
    of BLOCK_N, which must be a multiple of it. Every head dim up to 256 has a default per dtype; the
    16-bit default at BLOCK_D = 256 is the first of that head dim's candidates. The 16-bit defaults at
    the standard head dim are not the smallest tiles of the autotuning lists."""
    from gradmem_fast.kernels import attention_common as C, attention_layer0 as L0

    tables = {**C.DEFAULT_SHAPES, **L0.DEFAULT_SHAPES}
    for kind, table in tables.items():
        assert set(table) == {(fp32, bd) for fp32 in (False, True) for bd in (16, 32, 64, 128, 256)}, kind
        for (bm, bn, warps, stages) in [*table.values(), *_tuned_tables()[kind][0], *_tuned_tables()[kind][1]]:
            assert bm >= 16 and bn >= 16 and warps in (4, 8) and stages >= 1, kind
            if kind == "dkdv":
                assert bn % bm == 0
    for kind, (_, shapes_256, table) in _tuned_tables().items():
        assert table[(False, 256)] == shapes_256[0], kind
    for kind, shapes in (("fwd", C.FWD_SHAPES), ("dkdv", C.DKDV_SHAPES), ("dq", C.DQ_SHAPES),
                         ("mem_dkdv", L0.MEM_DKDV_SHAPES)):
        bm, bn, _, _ = tables[kind][(False, 64)]
        assert bm * bn > min(s[0] * s[1] for s in shapes), kind


# ---------------------------------------------------------------- on the card


@pytest.mark.gpu
def test_gpu_batch_split_and_64_bit_batch_offsets():
    """B * Hq = 544000 > 65535 (the launchers split the batch) and the last samples of q, o, do and dq
    start past 2**31 elements (64-bit batch offsets); about 22 GB."""
    from gradmem_fast.ops import attention as ops

    B, S, Hq, Hkv, D = 17000, 64, 32, 8, 64
    assert (B - 1) * S * Hq * D > 2 ** 31
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, do = (torch.randn(B, S, h, D, generator=g, device="cuda", dtype=torch.bfloat16)
                   for h in (Hq, Hkv, Hkv, Hq))
    lengths = torch.randint(1, S + 1, (B,), generator=g, device="cuda", dtype=torch.int32)
    o, lse = ops.attention_forward(q, k, v, lengths, 0.125, backend="kernel")
    grads = ops.attention_backward(do, q, k, v, o, lse, lengths, 0.125, backend="kernel")
    torch.cuda.synchronize()
    for part in (slice(0, 20), slice(B - 20, B)):
        ref_o, ref_lse = ops.attention_forward_reference(q[part], k[part], v[part], lengths[part], 0.125)
        ref_grads = ops.attention_backward_reference(do[part], q[part], k[part], v[part], ref_o, ref_lse,
                                                     lengths[part], 0.125)
        assert rel_err(o[part], ref_o) < 2e-2 and rel_err(lse[part], ref_lse) < 1e-5
        for x, r in zip(grads, ref_grads):
            assert rel_err(x[part], r) < 3e-2


@pytest.mark.gpu
@pytest.mark.parametrize("autotune", ["1", "0"])
@pytest.mark.parametrize("D, fp32_precision, tol", [(32, "ieee", 1e-5), (128, "ieee", 1e-5), (64, "tf32", 1e-2)])
def test_gpu_fp32_attention_precision(monkeypatch, autotune, D, fp32_precision, tol):
    """fp32 is true fp32 by default (far under 1e-4 against float64), TF32 only when allowed."""
    from gradmem_fast.ops import attention as ops

    monkeypatch.setenv("GRADMEM_FAST_AUTOTUNE", autotune)
    B, S, Hq, Hkv = 4, 905, 4, 2
    g = torch.Generator(device="cuda").manual_seed(1)
    q, k, v, do = (torch.randn(B, S, h, D, generator=g, device="cuda") for h in (Hq, Hkv, Hkv, Hq))
    lengths = torch.tensor([905, 1, 500, 777], dtype=torch.int32, device="cuda")
    matmul = torch.backends.cuda.matmul
    previous = matmul.fp32_precision
    try:
        matmul.fp32_precision = fp32_precision
        o, lse = ops.attention_forward(q, k, v, lengths, D ** -0.5, backend="kernel")
        grads = ops.attention_backward(do, q, k, v, o, lse, lengths, D ** -0.5, backend="kernel")
    finally:
        matmul.fp32_precision = previous
    d64 = [t.double() for t in (q, k, v, do)]
    ref_o, ref_lse = ops.attention_forward_reference(*d64[:3], lengths, D ** -0.5)
    ref_grads = ops.attention_backward_reference(d64[3], *d64[:3], ref_o, ref_lse, lengths, D ** -0.5)
    errors = [rel_err(o, ref_o)] + [rel_err(x, r) for x, r in zip(grads, ref_grads)]
    assert all(torch.isfinite(t).all() for t in (o, lse, *grads))
    assert max(errors) < tol, errors
    if fp32_precision == "tf32":
        assert max(errors) > 1e-5, errors  # the switch reached the kernels


def _tuned_tables():
    """{kind: (candidates, candidates at BLOCK_D = 256, default table)}"""
    from gradmem_fast.kernels import attention_common as C, attention_layer0 as L0

    return {"fwd": (C.FWD_SHAPES, C.FWD_SHAPES_256, C.DEFAULT_SHAPES["fwd"]),
            "dkdv": (C.DKDV_SHAPES, C.DKDV_SHAPES_256, C.DEFAULT_SHAPES["dkdv"]),
            "dq": (C.DQ_SHAPES, C.DQ_SHAPES_256, C.DEFAULT_SHAPES["dq"]),
            "ctx": (L0.CTX_SHAPES, L0.CTX_SHAPES_256, L0.DEFAULT_SHAPES["ctx"]),
            "mem_dkdv": (L0.MEM_DKDV_SHAPES, L0.MEM_DKDV_SHAPES_256, L0.DEFAULT_SHAPES["mem_dkdv"])}


def _shape(c):
    return c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages


@pytest.mark.parametrize("switch", ["0", "1"])
def test_autotuners_get_every_candidate_whatever_the_switch(monkeypatch, switch):
    """Triton runs a one-config autotuner without pruning it: a list collapsed to the 16-bit default
    when GRADMEM_FAST_AUTOTUNE=0 at import would launch that tile on fp32 at D = 128 once the switch
    is turned on (294,912 B of shared memory for the dQ kernel, over sm_90's 232,448)."""
    from gradmem_fast.kernels import attention_common as C

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setenv("GRADMEM_FAST_AUTOTUNE", switch)
    for kind, (shapes, shapes_256, _) in _tuned_tables().items():
        assert [_shape(c) for c in C.configs(shapes + shapes_256)] == list(shapes + shapes_256), kind


@pytest.mark.parametrize("kind", ["fwd", "dkdv", "dq", "ctx", "mem_dkdv"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("D", [16, 32, 64, 128, 256])
def test_autotuning_is_pruned_by_dtype_and_head_dim(kind, dtype, D):
    """The per-(dtype, head dim) default first, then only candidates listed for that head dim (those for
    BLOCK_D = 256 there, the others below): for fp32 the smaller tiles, for 16-bit every other candidate.
    A list holding only another dtype's tile still gives the right default."""
    import triton

    from gradmem_fast.kernels import attention_common as C

    shapes, shapes_256, table = _tuned_tables()[kind]
    every = shapes + [s for s in shapes_256 if s not in shapes]  # the autotuner's list
    candidates = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s) for bm, bn, w, s in every]
    prune = C.tile_prune(table, shapes, shapes_256)
    default = table[(dtype == torch.float32, D)]
    listed = shapes_256 if D == 256 else shapes
    nargs = {"Q": torch.empty(0, dtype=dtype), "LENGTHS": torch.empty(0, dtype=torch.int32)}
    first, *rest = [_shape(c) for c in prune(candidates, nargs, BLOCK_D=D)]
    assert first == default
    assert default not in rest and len(set(rest)) == len(rest)
    if dtype == torch.float32:
        assert rest == [s for s in every if s in listed and s[0] * s[1] < default[0] * default[1]]
    else:
        assert rest == [s for s in every if s in listed and s != default]
        assert len(rest) == len(listed) - (default in listed) >= 2
    other = table[(dtype != torch.float32, D)]
    lone = [triton.Config({"BLOCK_M": other[0], "BLOCK_N": other[1]}, num_warps=other[2], num_stages=other[3])]
    pruned = [_shape(c) for c in prune(lone, nargs, BLOCK_D=D)]
    assert pruned[0] == default
    if dtype == torch.float32:
        assert all(s[0] * s[1] < default[0] * default[1] for s in pruned[1:])


@pytest.mark.parametrize("D", [64, 128, 256])
def test_fp32_launches_stay_within_the_fp32_default_with_autotuning_on(launches, monkeypatch, D):
    """With the switch on, every fp32 launch of a tuned kernel is the fp32 default or a smaller tile."""
    from gradmem_fast.kernels import attention_common as C

    monkeypatch.setenv("GRADMEM_FAST_AUTOTUNE", "1")
    run_attention(2, 272, 8, 2, D, torch.float32)
    names = {"_fwd_kernel": "fwd", "_bwd_dkdv_kernel": "dkdv", "_bwd_dq_kernel": "dq", "_ctx_fwd_kernel": "ctx",
             "_mem_dkdv_kernel": "mem_dkdv"}
    tables = _tuned_tables()
    seen = set()
    for launch in launches:
        if launch.name in names:
            seen.add(launch.name)
            bm, bn, _, _ = tables[names[launch.name]][2][(True, C.block_d(D))]
            assert launch.kwargs["BLOCK_M"] * launch.kwargs["BLOCK_N"] <= bm * bn, launch.name
    assert seen == set(names)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 2e-6)])
def test_batch_split_matches_float64(monkeypatch, dtype, tol):
    """With the grid limit lowered so that a batch of 3 is launched in pieces (1 sample per launch at
    4 query heads, 2 at 2 kv heads), the full and layer-0 paths still match float64 autograd."""
    from gradmem_fast.kernels import attention_common as C
    from gradmem_fast.ops import attention as ops
    from test_attention import SCALE, err, float64_truth, make_qkv
    from test_attention_layer0 import layer0_path

    pieces = []
    batch_ranges = C.batch_ranges
    monkeypatch.setattr(C, "MAX_GRID_Y", 5)
    monkeypatch.setattr(C, "batch_ranges", lambda B, heads: pieces.append(batch_ranges(B, heads)) or pieces[-1])
    B, m, T, Hq, Hkv, D = 3, 8, 29, 4, 2, 32
    q, k, v = make_qkv(B, m + T, Hq, Hkv, D, dtype, seed=23)
    lc = torch.tensor([29, 1, 0], dtype=torch.int32)
    lens = lc + m
    do = torch.randn(B, m + T, Hq, D, generator=torch.Generator().manual_seed(5)).to(dtype)
    truth = float64_truth(q, k, v, lens, do, SCALE)
    o, lse = ops.attention_forward(q, k, v, lens, SCALE, backend="kernel")
    grads = ops.attention_backward(do, q, k, v, o, lse, lens, SCALE, backend="kernel")
    for name, x, ref in zip(("o", "lse", "dq", "dk", "dv"), (o, lse, *grads), truth):
        assert err(x, ref) < tol, f"{name}: {err(x, ref):.3g}"
    o, lse, grads = layer0_path(q, k, v, m, lc, do, "kernel")
    for name, x, ref in zip(("o", "lse", "dq_mem", "dk_mem", "dv_mem"), (o, lse, *grads),
                            (truth[0], truth[1], *(g[:, :m] for g in truth[2:]))):
        assert err(x, ref) < tol, f"layer 0 {name}: {err(x, ref):.3g}"
    assert [(0, 1), (1, 2), (2, 3)] in pieces and [(0, 2), (2, 3)] in pieces
