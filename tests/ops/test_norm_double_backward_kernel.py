"""The Triton kernel of the norms' double backward (kernels/norm_double_backward.py) against the float64 twins:
fp32 and fp16 under the interpreter at tiny shapes (row lengths not a power of two, one row, rows not a
multiple of the row block, several row blocks per program, the q/k norm on strided views of a wider
(B, S, H + Hkv, D) tensor, an fp32 weight with fp16 inputs, poisoned allocations), bf16 and real sizes on a
GPU; the ops end to end with the kernel; the backend choice; grids and offsets at large shapes."""
import math
import warnings

import pytest
import torch

import gradmem_fast.kernels.norm_double_backward as kernels  # imported while the interpreter is on
from gradmem_fast.ops import norm_double_backward as ndb
from gradmem_fast.ops.norm_double_backward import (add_norm_backward_op,
                                                   add_norm_backward_op_reference, add_norm_double_backward,
                                                   add_norm_double_backward_reference, add_norm_op,
                                                   qk_norm_backward_op, qk_norm_backward_op_reference,
                                                   qk_norm_double_backward, qk_norm_double_backward_reference,
                                                   qk_norm_op)
from helpers import rel_err, saved_during
from test_kernel_limits import MAX_GRID, _products, _source, launches, meta  # noqa: F401 (launches: a fixture)

pytestmark = pytest.mark.needs_triton  # every kernel test here launches Triton (interpreter or GPU)

KINDS = ("rms", "layer")
EPS = 1e-5
# (rows..., d): d not a power of two; one row; rows not a multiple of the interpreter's row block (4 at d <= 64,
# 2 at d <= 128) and several blocks per program; leading dims that flatten
ADD_SHAPES = [(37, 48), (1, 100), (2, 9, 100), (13, 7)]
# Inputs rounded to half are exact in float64, so the float64 twin on the same values is the true result. The
# kernel computes in fp32 (relative error ~1e-6) and rounds each output once: at most half an ulp, 2**-11 (fp16)
# or 2**-8 (bf16) of the largest entry; 1e-5 covers the fp32 arithmetic. fp32 outputs: 1e-5.
BOUND = {torch.float32: 1e-5, torch.float16: 2 ** -11 + 1e-5, torch.bfloat16: 2 ** -8 + 1e-5}


def _rand(*shape, seed, dtype=torch.float32, shift=0.0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(*shape, generator=g, dtype=torch.float64) + shift).to(dtype)


def add_inputs(shape, dtype, seed=0, w_dtype=None, device="cpu"):
    """(dy, h, w, u): h with a nonzero mean (the layer kind's centring matters), w near 1."""
    d = shape[-1]
    return tuple(t.to(device) for t in (
        _rand(*shape, seed=seed, dtype=dtype), _rand(*shape, seed=seed + 1, dtype=dtype, shift=0.5),
        _rand(d, seed=seed + 2, dtype=w_dtype or dtype, shift=1.0, scale=0.3),
        _rand(*shape, seed=seed + 3, dtype=dtype)))


def qk_inputs(B, S, H, Hkv, D, dtype, part="k", seed=0, w_dtype=None, device="cpu"):
    """(dy, x, w, u) of one part of the q/k norm: x and dy strided views of wider (B, S, H + Hkv, D) tensors (as
    the engine passes them), u contiguous; w (G, D) with G = H (part "q") or Hkv (part "k")."""
    heads = slice(0, H) if part == "q" else slice(H, H + Hkv)
    G = H if part == "q" else Hkv
    qk = _rand(B, S, H + Hkv, D, seed=seed + 1, dtype=dtype, shift=0.2).to(device)
    d_qk = _rand(B, S, H + Hkv, D, seed=seed, dtype=dtype).to(device)
    w = _rand(G, D, seed=seed + 2, dtype=w_dtype or dtype, shift=1.0, scale=0.3).to(device)
    return d_qk[:, :, heads], qk[:, :, heads], w, _rand(B, S, G, D, seed=seed + 3, dtype=dtype).to(device)


def _poisoning_empty(monkeypatch):
    """torch.empty returns NaN-filled tensors (the launcher's outputs and partial sums): an element the kernel
    does not write fails the comparison."""
    empty = torch.empty

    def poisoned(*args, **kwargs):
        t = empty(*args, **kwargs)
        return t.fill_(math.nan) if t.is_floating_point() and t.device.type != "meta" else t

    monkeypatch.setattr(torch, "empty", poisoned)


def _count_launches(monkeypatch):
    """A list that grows by one per call of the kernel launcher the ops import."""
    calls, launch = [], kernels.norm_double_backward

    def counting(*args, **kwargs):
        calls.append(args)
        return launch(*args, **kwargs)

    monkeypatch.setattr(kernels, "norm_double_backward", counting)
    return calls


def plain_add_norm(dy, h, w, u, kind):
    """The double backward by plain torch in the inputs' dtype: the first-order backward written with torch ops
    on half tensors (weight cast to their dtype), differentiated by autograd."""
    dy, h, w = (t.detach().to(dy.dtype).requires_grad_(True) for t in (dy, h, w))
    hc = h - h.mean(-1, keepdim=True) if kind == "layer" else h
    r = torch.rsqrt(hc.square().mean(-1, keepdim=True) + EPS)
    xhat = hc * r
    g = dy * w
    dx = r * (g - xhat * (g * xhat).mean(-1, keepdim=True))
    if kind == "layer":
        dx = dx - r * g.mean(-1, keepdim=True)
    return torch.autograd.grad(dx, (dy, h, w), u)


def check(got, want, likes, plain=None):
    """Each result like its input (dtype, shape) and within BOUND of its float64 value; half results also within
    2x the error of `plain()` (the same formulas by plain torch in the half dtype)."""
    baseline = None
    for i, (a, b, like) in enumerate(zip(got, want, likes)):
        assert a.dtype == like.dtype and a.shape == like.shape == b.shape
        err = rel_err(a, b)
        assert err < BOUND[a.dtype], (i, err)
        if a.dtype != torch.float32 and plain is not None:
            baseline = plain() if baseline is None else baseline
            assert err <= 2.0 * rel_err(baseline[i], b), (i, err, rel_err(baseline[i], b))


def _f64(*ts):
    return [t.double() for t in ts]


# ---------------------------------------------------------------- the launcher against the float64 twins


def test_the_interpreter_shapes_run_several_blocks_per_program_and_a_ragged_last_one():
    # what ADD_SHAPES exercise: (37, 48) spreads 10 row blocks of 4 over 3 programs of 4 blocks
    block_r, block_d, _, n_iter, programs = kernels.launch_config(37, 1, 48)
    assert (block_r, block_d) == (4, 64) and n_iter > 1 and programs > 1 and 37 % block_r
    assert (programs - 1) * n_iter * block_r < 37 < programs * n_iter * block_r
    assert kernels.launch_config(1, 1, 100)[1] == 128


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", ADD_SHAPES)
@pytest.mark.parametrize("kind", KINDS)
def test_add_norm_kernel_matches_float64(kind, shape, dtype, monkeypatch):
    dy, h, w, u = add_inputs(shape, dtype, seed=sum(shape))
    _poisoning_empty(monkeypatch)
    dy_bar, h_bar, w_bar = kernels.norm_double_backward(dy, h, w, u, EPS, kind == "layer")
    monkeypatch.undo()
    want = add_norm_double_backward_reference(*_f64(dy, h, w), EPS, kind, u.double())
    assert w_bar.dtype == torch.float32
    check((dy_bar, h_bar, w_bar.to(w.dtype)), want, (dy, h, w), lambda: plain_add_norm(dy, h, w, u, kind))


@pytest.mark.parametrize("kind", KINDS)
def test_fp32_weight_with_fp16_inputs(kind):
    dy, h, w, u = add_inputs((21, 48), torch.float16, seed=5, w_dtype=torch.float32)
    got = add_norm_double_backward(dy, h, w, EPS, kind, u, backend="kernel")
    want = add_norm_double_backward_reference(*_f64(dy, h, w), EPS, kind, u.double())
    check(got, want, (dy, h, w), lambda: plain_add_norm(dy, h, w, u, kind))
    dy, x, w, u = qk_inputs(2, 5, 3, 2, 48, torch.float16, seed=6, w_dtype=torch.float32)
    got = qk_norm_double_backward(dy, x, w, EPS, u, backend="kernel")
    want = qk_norm_double_backward_reference(*_f64(dy, x, w), EPS, u.double())
    check(got, want, (dy, x, w), lambda: plain_qk_norm(dy, x, w, u))


def plain_qk_norm(dy, x, w, u):
    return plain_add_norm(dy, x, w, u, "rms")  # each (..., g) row an RMS norm, w (G, D) broadcast over the rows


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("part, D", [("q", 48), ("k", 48), ("k", 100), ("q", 7)])
def test_qk_norm_kernel_on_strided_views_matches_float64(part, D, dtype, monkeypatch):
    dy, x, w, u = qk_inputs(2, 5, 3, 2, D, dtype, part=part, seed=D)
    assert not x.is_contiguous() and not dy.is_contiguous()
    seen = []
    kernel = kernels._norm_double_backward_kernel

    class Spy:  # the kernel reads x and dy in place: the pointers it gets are theirs
        def __getitem__(self, grid):
            def run(*args, **kwargs):
                seen.append((grid, args[0].data_ptr(), args[1].data_ptr()))
                return kernel[grid](*args, **kwargs)
            return run

    monkeypatch.setattr(kernels, "_norm_double_backward_kernel", Spy())
    _poisoning_empty(monkeypatch)
    got = kernels.norm_double_backward(dy, x, w, u, EPS, False)
    monkeypatch.undo()
    [(grid, p_dy, p_x)] = seen
    assert grid[1] == w.shape[0] and (p_dy, p_x) == (dy.data_ptr(), x.data_ptr())
    want = qk_norm_double_backward_reference(*_f64(dy, x, w), EPS, u.double())
    check((got[0], got[1], got[2].to(w.dtype)), want, (dy, x, w), lambda: plain_qk_norm(dy, x, w, u))


def test_an_expanded_cotangent_and_empty_rows():
    dy, h, w, _ = add_inputs((9, 48), torch.float32, seed=7)
    # a row broadcast over the rows (read with row stride 0), and the cotangent of 0.7 * dx.sum() (copied)
    for kind, u in (("layer", _rand(48, seed=8).expand(9, 48)), ("rms", torch.full((), 0.7).expand(9, 48))):
        got = kernels.norm_double_backward(dy, h, w, u, EPS, kind == "layer")
        want = add_norm_double_backward_reference(*_f64(dy, h, w), EPS, kind, u.double())
        check(got, want, (dy, h, w))
    empty = torch.empty(0, 3, 48)
    dy_bar, h_bar, w_bar = kernels.norm_double_backward(empty, empty, torch.ones(3, 48), empty, EPS, False)
    assert dy_bar.shape == h_bar.shape == (0, 3, 48) and torch.equal(w_bar, torch.zeros(3, 48))


def test_the_row_length_limit(monkeypatch):
    assert kernels.MAX_D == 8192
    with pytest.raises(ValueError, match="8193 is over the kernel's maximum 8192"):
        kernels.launch_config(1, 1, 8193)
    dy, h, w, u = add_inputs((1, 8193), torch.float32, seed=8)
    with pytest.raises(RuntimeError, match="row length 8193"):
        add_norm_double_backward(dy, h, w, EPS, "rms", u, backend="kernel")
    calls = _count_launches(monkeypatch)
    with pytest.warns(UserWarning, match="row length 8193"):  # a limit of the kernel: "auto" says so
        got = add_norm_double_backward(dy, h, w, EPS, "rms", u)
    assert not calls
    for a, b in zip(got, add_norm_double_backward_reference(dy, h, w, EPS, "rms", u)):
        assert torch.equal(a, b)


# ---------------------------------------------------------------- the ops end to end


def _vjp(fn, inputs, cotangent):
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    return torch.autograd.grad(fn(*leaves), leaves, cotangent)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_qk_norm_backward_op_with_the_kernel(dtype, monkeypatch):
    calls = _count_launches(monkeypatch)
    dy, x, w, u = qk_inputs(2, 5, 3, 2, 48, dtype, part="k", seed=9)
    dx = qk_norm_backward_op(dy, x, w, EPS, backend="kernel")
    assert rel_err(dx, qk_norm_backward_op_reference(*_f64(dy, x, w), EPS)) < BOUND[dtype]
    got = _vjp(lambda *a: qk_norm_backward_op(*a, EPS, backend="kernel"), (dy, x, w), u)
    assert len(calls) == 1
    check(got, qk_norm_double_backward_reference(*_f64(dy, x, w), EPS, u.double()), (dy, x, w),
          lambda: plain_qk_norm(dy, x, w, u))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_qk_norm_op_second_order_with_the_kernel(dtype, monkeypatch):
    # <u, d/dx <dy, qk_norm(x)>>: the backward op under autograd, its own backward the kernel
    calls = _count_launches(monkeypatch)
    dy, x, w, u = qk_inputs(2, 5, 3, 2, 48, dtype, part="q", seed=10)
    x_, w_ = x.detach().clone().requires_grad_(True), w.detach().clone().requires_grad_(True)
    (dx,) = torch.autograd.grad(qk_norm_op(x_, w_, EPS, backend="kernel")[0], x_, dy, create_graph=True)
    got = torch.autograd.grad(dx, (x_, w_), u)
    assert len(calls) == 1
    _, x_bar, w_bar = qk_norm_double_backward_reference(*_f64(dy, x, w), EPS, u.double())
    check(got, (x_bar, w_bar), (x, w))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("kind", KINDS)
def test_add_norm_backward_op_takes_the_kernel_under_auto(kind, dtype, monkeypatch):
    # on the CPU the first-order values are add_norm.py's twins by design; the double backward is the kernel
    calls = _count_launches(monkeypatch)
    dy, h, w, u = add_inputs((3, 7, 48), dtype, seed=11)
    d_res = _rand(3, 7, 48, seed=15, dtype=dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dx = add_norm_backward_op(dy, h, w, EPS, kind, d_res)
        got = _vjp(lambda dy, h, w, r: add_norm_backward_op(dy, h, w, EPS, kind, r), (dy, h, w, d_res), u)
    assert len(calls) == 1
    assert rel_err(dx, add_norm_backward_op_reference(*_f64(dy, h, w), EPS, kind, d_res.double())) < BOUND[dtype]
    check(got[:3], add_norm_double_backward_reference(*_f64(dy, h, w), EPS, kind, u.double()), (dy, h, w),
          lambda: plain_add_norm(dy, h, w, u, kind))
    assert torch.equal(got[3], u)  # d_residual_out's cotangent passes straight through


@pytest.mark.parametrize("kind", KINDS)
def test_add_norm_op_second_order_with_the_kernel(kind, monkeypatch):
    calls = _count_launches(monkeypatch)
    x, res, w, _ = add_inputs((5, 48), torch.float32, seed=12)
    dy, u = _rand(5, 48, seed=16), _rand(5, 48, seed=17)
    leaves = [t.clone().requires_grad_(True) for t in (x, res, w)]
    y, _, _ = add_norm_op(*leaves[:2], leaves[2], None, EPS, kind)
    (dx,) = torch.autograd.grad(y, leaves[0], dy, create_graph=True)
    got = torch.autograd.grad(dx, leaves, u)
    assert len(calls) == 1
    _, h_bar, w_bar = add_norm_double_backward_reference(dy.double(), (x + res).double(), w.double(), EPS, kind,
                                                         u.double())
    check(got, (h_bar, h_bar, w_bar), (x, res, w))


def test_add_norm_ops_with_kernel_need_the_first_order_kernels():
    # "kernel" holds for the first-order values too: add_norm.py's kernels are CUDA C++ only
    dy, h, w, _ = add_inputs((5, 48), torch.float32, seed=13)
    with pytest.raises(RuntimeError, match="add_norm_forward"):
        add_norm_backward_op(dy, h, w, EPS, "rms", backend="kernel")


def test_reference_takes_the_twins(monkeypatch):
    calls = _count_launches(monkeypatch)
    dy, h, w, u = add_inputs((5, 48), torch.float32, seed=14)
    got = _vjp(lambda *a: add_norm_backward_op(*a, EPS, "layer", backend="reference"), (dy, h, w), u)
    for a, b in zip(got, add_norm_double_backward_reference(dy, h, w, EPS, "layer", u)):
        assert torch.equal(a, b)
    dy, x, w, u = qk_inputs(2, 3, 3, 2, 48, torch.float32, seed=15)
    got = _vjp(lambda *a: qk_norm_backward_op(*a, EPS, backend="reference"), (dy, x, w), u)
    for a, b in zip(got, qk_norm_double_backward_reference(dy, x, w, EPS, u)):
        assert torch.equal(a, b)
    assert not calls


def test_create_graph_runs_the_twin_and_a_third_derivative_works(monkeypatch):
    calls = _count_launches(monkeypatch)
    inputs = qk_inputs(2, 3, 3, 2, 48, torch.float32, seed=16)

    def third(dtype, backend):
        dy, x, w, u = (t.detach().to(dtype) for t in inputs)
        leaves = [t.requires_grad_(True) for t in (dy, x, w)]
        bars = torch.autograd.grad(qk_norm_backward_op(*leaves, EPS, backend=backend), leaves, u, create_graph=True)
        assert all(b.requires_grad for b in bars)
        return torch.autograd.grad(sum((b * b).sum() for b in bars), leaves)

    got = third(torch.float32, "kernel")
    assert not calls  # under create_graph the double backward is the twin
    for a, b in zip(got, third(torch.float64, "reference")):
        assert rel_err(a, b) < 1e-5


def test_the_kernel_path_saves_only_the_inputs():
    dy, x, w, _ = (t.requires_grad_(True) for t in qk_inputs(2, 3, 3, 2, 48, torch.float32, seed=17))
    _, saved = saved_during(lambda: qk_norm_backward_op(dy, x, w, EPS, backend="kernel"))
    assert [t.data_ptr() for t in saved] == [dy.data_ptr(), x.data_ptr(), w.data_ptr()]


# ---------------------------------------------------------------- the backend choice


def test_float64_kernel_raises_and_auto_takes_the_twin_with_a_warning(monkeypatch):
    calls = _count_launches(monkeypatch)
    dy, h, w, u = add_inputs((5, 48), torch.float64, seed=18)
    with pytest.raises(RuntimeError, match="add_norm_double_backward: the Triton kernel cannot run.*float64"):
        add_norm_double_backward(dy, h, w, EPS, "rms", u, backend="kernel")
    dy, x, wq, uq = qk_inputs(2, 3, 3, 2, 48, torch.float64, seed=18)
    with pytest.raises(RuntimeError, match="qk_norm_double_backward: the Triton kernel cannot run.*float64"):
        qk_norm_double_backward(dy, x, wq, EPS, uq, backend="kernel")
    with pytest.raises(RuntimeError, match="float64"):
        qk_norm_backward_op(dy, x, wq, EPS, backend="kernel")
    with pytest.warns(UserWarning, match="qk_norm_double_backward: the Triton kernel cannot run.*float64"):
        got = qk_norm_double_backward(dy, x, wq, EPS, uq)
    with pytest.warns(UserWarning, match="float64"):  # the first-order q/k kernels say so too
        _vjp(lambda *a: qk_norm_backward_op(*a, EPS), (dy, x, wq), uq)
    for a, b in zip(got, qk_norm_double_backward_reference(dy, x, wq, EPS, uq)):
        assert torch.equal(a, b)
    assert not calls


def test_without_the_interpreter_on_cpu_kernel_raises_and_auto_falls_back_silently(monkeypatch):
    dy, h, w, u = add_inputs((5, 48), torch.float32, seed=19)
    dyq, x, wq, uq = qk_inputs(2, 3, 3, 2, 48, torch.float32, seed=19)
    calls = _count_launches(monkeypatch)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="Triton needs CUDA"):
        add_norm_double_backward(dy, h, w, EPS, "layer", u, backend="kernel")
    with pytest.raises(RuntimeError, match="Triton needs CUDA"):
        qk_norm_double_backward(dyq, x, wq, EPS, uq, backend="kernel")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = _vjp(lambda *a: add_norm_backward_op(*a, EPS, "layer"), (dy, h, w), u)
        got_qk = _vjp(lambda *a: qk_norm_backward_op(*a, EPS), (dyq, x, wq), uq)
    assert not calls
    for a, b in zip(got, add_norm_double_backward_reference(dy, h, w, EPS, "layer", u)):
        assert torch.equal(a, b)
    for a, b in zip(got_qk, qk_norm_double_backward_reference(dyq, x, wq, EPS, uq)):
        assert torch.equal(a, b)


def test_auto_takes_the_kernel_under_the_interpreter(monkeypatch):
    calls = _count_launches(monkeypatch)
    dy, x, w, u = qk_inputs(2, 3, 3, 2, 48, torch.float16, seed=20)
    assert ndb.double_backward_kernel_reason(dy, x, w, u) is None
    qk_norm_double_backward(dy, x, w, EPS, u)
    dy, h, w, u = add_inputs((5, 48), torch.float32, seed=20)
    add_norm_double_backward(dy, h, w, EPS, "rms", u)
    assert len(calls) == 2
    # bfloat16 under the interpreter: the twin by design
    why = ndb.double_backward_kernel_reason(dy, h, w.bfloat16(), u)
    assert why is not None and why.by_design and "bfloat16" in why.text


def test_bad_backend_and_arguments():
    dy, h, w, u = add_inputs((5, 48), torch.float32, seed=21)
    with pytest.raises(ValueError, match="'triton'"):
        add_norm_double_backward(dy, h, w, EPS, "rms", u, backend="triton")
    with pytest.raises(ValueError, match="'cuda'"):
        add_norm_op(h, None, w, None, EPS, "rms", backend="cuda")
    with pytest.raises(ValueError, match=r"g_dx.*\(5, 47\)"):
        add_norm_double_backward(dy, h, w, EPS, "rms", u[:, :47])
    dy, x, wq, uq = qk_inputs(2, 3, 3, 2, 48, torch.float32, seed=21)
    with pytest.raises(ValueError, match="g_dx.*float16"):
        qk_norm_double_backward(dy, x, wq, EPS, uq.half())


# ---------------------------------------------------------------- grids and offsets (nothing launched)


@pytest.mark.parametrize("shape, G", [((1 << 21, 8192), 1), ((1 << 20, 768), 1), ((1 << 18, 64, 128), 64),
                                      ((7, 4096), 1)])
def test_grids_fit_and_cover_the_rows_at_large_shapes(launches, shape, G):
    D = shape[-1]
    h = meta(*shape)
    w = meta(G, D) if len(shape) == 3 else meta(D)
    kernels.norm_double_backward(h, h, w, h, EPS, len(shape) == 2)
    [launch] = launches
    assert all(g <= m for g, m in zip(launch.grid, MAX_GRID)) and launch.grid[1] == G
    N = h.numel() // (G * D)
    block_r, block_d, warps, n_iter, programs = kernels.launch_config(N, G, D)
    assert launch.grid[0] == programs and block_d >= D and warps <= 16
    assert (programs - 1) * n_iter * block_r < N <= programs * n_iter * block_r  # every row, no idle program
    assert programs * G * D <= max(N * G * D // 8, G * D)  # the partial sums: at most 1/8 of the rows


def test_row_offsets_are_64_bit():
    products = _products(_source("norm_double_backward.py"), r"stride_\w+|D\b|G\b")
    assert products
    for left, right in products:
        assert "64" in left, f"{left} * {right}"


# ---------------------------------------------------------------- on a GPU


GPU_ACCURACY = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_ACCURACY)
@pytest.mark.parametrize("case", ["layer 4096x768", "rms 4096x2048", "qk 4096x24x128"])
def test_gpu_real_sizes_match_float64(case, dtype, monkeypatch):
    calls = _count_launches(monkeypatch)
    if case.startswith("qk"):
        dy, x, w, u = qk_inputs(2, 2048, 24, 8, 128, dtype, part="q", seed=30, device="cuda")
        got = qk_norm_double_backward(dy, x, w, EPS, u, backend="kernel")
        want = qk_norm_double_backward_reference(*_f64(dy, x, w), EPS, u.double())
        plain, likes = (lambda: plain_qk_norm(dy, x, w, u)), (dy, x, w)
        op = _vjp(lambda *a: qk_norm_backward_op(*a, EPS, backend="kernel"), (dy, x, w), u)
    else:
        kind, size = case.split()
        rows, d = map(int, size.split("x"))
        dy, h, w, u = add_inputs((rows, d), dtype, seed=31, device="cuda")
        got = add_norm_double_backward(dy, h, w, EPS, kind, u, backend="kernel")
        want = add_norm_double_backward_reference(*_f64(dy, h, w), EPS, kind, u.double())
        plain, likes = (lambda: plain_add_norm(dy, h, w, u, kind)), (dy, h, w)
        # the first-order values from add_norm.py's CUDA kernels where built, else their twins ("auto")
        op = _vjp(lambda *a: add_norm_backward_op(*a, EPS, kind), (dy, h, w), u)
    assert len(calls) == 2
    check(got, want, likes, plain)
    check(op, want, likes, plain)
