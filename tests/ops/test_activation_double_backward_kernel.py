"""The Triton kernel of the activations' double backward against the float64 twin: fp32 and fp16 under the
interpreter at awkward sizes, None cotangents, saturating inputs, poisoned outputs; the ops end to end on it;
the backend choice; bf16 / fp16 / fp32 at a real size on a GPU."""
import re
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import gradmem_fast.kernels.activation_double_backward as kernels  # imported while the interpreter is on
from gradmem_fast.ops.activation_double_backward import (ACTIVATIONS, GATED, activation_backward_op,
                                                         activation_backward_reference, activation_double_backward,
                                                         activation_double_backward_reference, activation_op)
from helpers import poison_, rel_err
from test_kernel_limits import MAX_GRID, launches, meta  # noqa: F401 (launches is a fixture)

pytestmark = pytest.mark.needs_triton  # every kernel test here launches Triton (interpreter or GPU)

SIZES = [(1,), (1000,), (1037,), (2, 3, 53)]
FP32_RTOL = 1e-5
# Inputs rounded to 16 bits are exact in float64, so the float64 twin on them is the true result to ~1e-16.
# The kernel computes in float32 (relative error ~1e-6 of the largest entry, sech^2 without cancellation) and
# rounds each output once: at most half an ulp of the entry, 2**-11 (fp16) or 2**-8 (bf16) of the largest
# one. The bounds add a quarter for the float32 part (far more than it needs).
ROUNDING_BOUND = {torch.float16: 1.25 * 2.0 ** -11, torch.bfloat16: 1.25 * 2.0 ** -8}


def _rand(shape, seed, dtype, scale=1.0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(*shape, generator=g, dtype=torch.float64)).clamp(-12.0, 12.0).to(dtype).to(device)


def make_inputs(kind, shape, dtype, seed, device="cpu"):
    """dy, pre (the gate or x with |values| out to 12, where sigmoid and tanh saturate; up), the cotangents
    of the backward's outputs, all rounded to dtype."""
    n = 2 if kind in GATED else 1
    dy = _rand(shape, seed, dtype, device=device)
    pre = (_rand(shape, seed + 1, dtype, scale=4.0, device=device),)
    if n == 2:
        pre += (_rand(shape, seed + 2, dtype, device=device),)
    bars = tuple(_rand(shape, seed + 3 + i, dtype, device=device) for i in range(n))
    if dy.numel() >= 2:  # both ends of the saturation
        pre[0].view(-1)[0], pre[0].view(-1)[-1] = 12.0, -12.0
    return dy, pre, bars


def bar_cases(kind, bars):
    """All cotangents given, and (gated kinds) each one None in turn, and none at all."""
    if kind not in GATED:
        return [bars, (None,)]
    return [bars, (None, bars[1]), (bars[0], None), (None, None)]


def float64_twin(kind, dy, pre, bars):
    return activation_double_backward_reference(kind, dy.double(), tuple(t.double() for t in pre),
                                                tuple(None if b is None else b.double() for b in bars))


def plain_torch(kind, dy, pre, bars):
    """The unfused computation in the inputs' dtype: the activation by torch.nn.functional, autograd twice."""
    leaves = [t.detach().clone().requires_grad_(True) for t in (dy, *pre)]
    d, *p = leaves
    if kind == "swiglu":
        y = F.silu(p[0]) * p[1]
    elif kind == "geglu_tanh":
        y = F.gelu(p[0], approximate="tanh") * p[1]
    else:
        y = F.gelu(p[0], approximate="tanh" if kind == "gelu_tanh" else "none")
    first = torch.autograd.grad(y, p, d, create_graph=True)
    given = [i for i, b in enumerate(bars) if b is not None]
    return torch.autograd.grad([first[i] for i in given], leaves, [bars[i] for i in given], allow_unused=True,
                               materialize_grads=True)


def assert_close(got, want, inputs, dtype, plain=None):
    """Each result in its input's dtype and shape; fp32 within FP32_RTOL of the float64 twin, fp16 / bf16 within
    the rounding bound and (plain given) within twice the error of plain PyTorch in that dtype."""
    assert len(got) == len(want) == len(inputs)
    baseline = plain() if plain is not None and dtype != torch.float32 else (None,) * len(want)
    for a, c, t, p in zip(got, want, inputs, baseline):
        assert a.dtype == t.dtype == dtype and a.shape == t.shape
        err = rel_err(a, c)
        if dtype == torch.float32:
            assert err < FP32_RTOL, err
        else:
            assert err < ROUNDING_BOUND[dtype], err
            if p is not None:
                assert err <= 2.0 * rel_err(p, c), (err, rel_err(p, c))


@pytest.fixture
def poisoned(monkeypatch):
    """The launcher's outputs filled with NaN before the kernel runs: an unwritten element fails."""
    monkeypatch.setattr(kernels, "_empty", lambda ref: poison_(torch.empty(ref.shape, dtype=ref.dtype,
                                                                             device=ref.device)))


@pytest.fixture
def spy(monkeypatch):
    """Counts the launcher's calls (the op imports it from the kernel module at each call)."""
    calls = []
    launch = kernels.activation_double_backward

    def counting(*args, **kwargs):
        calls.append(args[0])
        return launch(*args, **kwargs)

    monkeypatch.setattr(kernels, "activation_double_backward", counting)
    return calls


# ---------------------------------------------------------------- the kernel against the float64 twin


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", SIZES)
@pytest.mark.parametrize("kind", ACTIVATIONS)
def test_kernel_matches_float64(kind, shape, dtype, poisoned):
    dy, pre, bars = make_inputs(kind, shape, dtype, seed=sum(shape))
    for case in bar_cases(kind, bars):
        got = kernels.activation_double_backward(kind, dy, pre, case)
        want = float64_twin(kind, dy, pre, case)
        if all(b is None for b in case):  # no cotangent at all: zeros
            assert all(a.dtype == t.dtype and a.shape == t.shape and (a == 0).all() for a, t in zip(got, (dy, *pre)))
            continue
        assert_close(got, want, (dy, *pre), dtype, lambda: plain_torch(kind, dy, pre, case))
        if case is bars and shape != (1,):
            assert want[1].abs().max() > 0  # the gate's (or x's) cotangent through f'' is not trivially 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("kind", ACTIVATIONS)
def test_kernel_over_the_saturating_range(kind, dtype, poisoned):
    # dy = 1, up = 1 and the d_gate / dx cotangent 1: the gate's cotangent is f''(x) itself, across |x| <= 12
    # (sigmoid and tanh saturate; f'' of the tanh GELU is accurate there only with sech^2 from exp)
    x = torch.linspace(-12.0, 12.0, 4001, dtype=torch.float64).to(dtype)
    one = torch.ones_like(x)
    pre = (x, one) if kind in GATED else (x,)
    bars = (one, None) if kind in GATED else (one,)
    got = kernels.activation_double_backward(kind, one, pre, bars)
    want = float64_twin(kind, one, pre, bars)
    assert_close(got, want, (one, *pre), dtype)
    if dtype == torch.float32:
        assert rel_err(got[1], want[1]) < 2e-6


@pytest.mark.parametrize("kind", ACTIVATIONS)
def test_strided_and_expanded_inputs(kind):
    dy, pre, bars = make_inputs(kind, (37, 29), torch.float32, seed=3)
    contiguous = kernels.activation_double_backward(kind, dy, pre, bars)
    # transposed views of every input: the same elementwise values, in the views' shape
    got = kernels.activation_double_backward(kind, dy.t(), tuple(t.t() for t in pre), tuple(b.t() for b in bars))
    for a, c in zip(got, contiguous):
        assert a.is_contiguous() and a.shape == (29, 37) and torch.equal(a, c.t())
    # a cotangent as autograd hands that of a summed output: an expanded, stride-0 view
    ones = torch.ones(()).expand(37, 29)
    expanded = kernels.activation_double_backward(kind, dy, pre, (ones,) + bars[1:])
    dense = kernels.activation_double_backward(kind, dy, pre, (torch.ones(37, 29),) + bars[1:])
    assert all(torch.equal(a, c) for a, c in zip(expanded, dense))
    assert not torch.equal(dense[1], contiguous[1])


def test_empty_input():
    x = torch.empty(0, 5)
    dy_bar, x_bar = kernels.activation_double_backward("gelu", x, (x,), (x,))
    assert dy_bar.shape == x_bar.shape == (0, 5)


def test_offsets_are_64_bit():
    """Every program id is an int64 value before it is multiplied by the block size."""
    text = (Path(__file__).resolve().parents[2] / "kernels" / "activation_double_backward.py").read_text()
    ids = re.findall(r"tl\.program_id\(\d\)[^\n]*", text)
    assert ids and all(line.startswith("tl.program_id(0).to(tl.int64)") for line in ids), ids
    assert re.search(r"o = i_b \* BLOCK \+ tl\.arange", text)


def test_gpu_launch_at_a_large_size(launches):
    """At 3 * 2**30 elements (offsets past 2**31; recorded on meta tensors, nothing runs): one launch, a grid
    within CUDA's limits, n passed whole."""
    n = 3 * 2 ** 30
    t = meta(n)
    kernels.activation_double_backward("geglu_tanh", t, (t, t), (t, None))
    assert [launch.name for launch in launches] == ["_activation_double_backward_kernel"]
    (launch,) = launches
    assert launch.grid == (n // kernels.BLOCK, 1, 1) and launch.grid[0] < MAX_GRID[0]
    assert [a for a in launch.args if isinstance(a, int)] == [n]
    assert launch.kwargs["HAS_A"] and not launch.kwargs["HAS_B"]
    assert launch.kwargs["KIND"] == kernels.KINDS["geglu_tanh"]


# ---------------------------------------------------------------- the ops end to end


def _op_double_backward(kind, dy, pre, bars, backend):
    """The cotangents of (dy, *pre) of <bars, activation_backward_op(kind, dy, *pre)> through the op's node."""
    leaves = [t.clone().requires_grad_(True) for t in (dy, *pre)]
    outs = activation_backward_op(kind, *leaves, backend=backend)
    outs = outs if isinstance(outs, tuple) else (outs,)
    given = [i for i, b in enumerate(bars) if b is not None]
    return outs, torch.autograd.grad([outs[i] for i in given], leaves, [bars[i] for i in given])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("kind", ACTIVATIONS)
def test_op_end_to_end_on_the_kernel(kind, dtype, spy):
    # "auto": the double backward on the Triton kernel under the interpreter; the first-order values on
    # geglu's Triton kernel, or the twins of the CUDA-only first-order kernels here
    dy, pre, bars = make_inputs(kind, (3, 347), dtype, seed=5)
    for case in bar_cases(kind, bars)[:-1]:
        outs, got = _op_double_backward(kind, dy, pre, case, "auto")
        assert_close(got, float64_twin(kind, dy, pre, case), (dy, *pre), dtype,
                     lambda: plain_torch(kind, dy, pre, case))
    assert spy == [kind] * (len(bar_cases(kind, bars)) - 1)
    first = activation_backward_reference(kind, dy.double(), *(t.double() for t in pre))
    assert_close(outs, first if isinstance(first, tuple) else (first,), pre, dtype)
    # through activation_op: its backward (create_graph) is the backward op, whose backward is the kernel
    leaves = [t.clone().requires_grad_(True) for t in (dy, *pre)]
    y = activation_op(kind, *leaves[1:])
    grads = torch.autograd.grad(y, leaves[1:], leaves[0], create_graph=True)
    got = torch.autograd.grad(grads, leaves, bars)
    assert_close(got, float64_twin(kind, dy, pre, bars), (dy, *pre), dtype)
    assert len(spy) == len(bar_cases(kind, bars))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_op_end_to_end_with_backend_kernel(dtype, spy):
    # geglu's first-order kernels are Triton too: every value of the op on a kernel here
    kind = "geglu_tanh"
    dy, pre, bars = make_inputs(kind, (5, 211), dtype, seed=7)
    outs, got = _op_double_backward(kind, dy, pre, bars, "kernel")
    assert spy == [kind]
    assert_close(got, float64_twin(kind, dy, pre, bars), (dy, *pre), dtype, lambda: plain_torch(kind, dy, pre, bars))
    assert_close(outs, activation_backward_reference(kind, dy.double(), *(t.double() for t in pre)), pre, dtype)


@pytest.mark.parametrize("kind", ["swiglu", "gelu_tanh", "gelu"])
def test_backend_kernel_needs_cuda_for_the_csrc_first_order_kernels(kind):
    dy, pre, _ = make_inputs(kind, (4, 9), torch.float32, seed=9)
    with pytest.raises(RuntimeError, match="csrc kernel cannot run"):
        activation_op(kind, *pre, backend="kernel")
    with pytest.raises(RuntimeError, match="csrc kernel cannot run"):
        activation_backward_op(kind, dy, *pre, backend="kernel")


@pytest.mark.parametrize("kind", ACTIVATIONS)
def test_create_graph_takes_the_twin(kind, spy):
    # a third derivative: under create_graph the double backward is the twin under autograd
    dy, pre, bars = make_inputs(kind, (4, 33), torch.float32, seed=11)
    leaves = [t.clone().requires_grad_(True) for t in (dy, *pre)]
    outs = activation_backward_op(kind, *leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    got = torch.autograd.grad(outs, leaves, bars, create_graph=True)
    assert spy == [] and all(a.requires_grad for a in got[1:])
    want = activation_double_backward_reference(kind, dy, pre, bars)
    assert all(torch.equal(a.detach(), c) for a, c in zip(got, want))
    third = torch.autograd.grad(got[1].sum(), leaves[1])[0]  # differentiable once more
    assert torch.isfinite(third).all() and third.abs().max() > 0


@pytest.mark.parametrize("kind", ACTIVATIONS)
def test_nodes_save_only_their_inputs_on_the_kernel(kind, spy):
    from helpers import saved_during

    dy, pre, bars = make_inputs(kind, (5, 6), torch.float32, seed=13)
    leaves = [t.clone().requires_grad_(True) for t in (dy, *pre)]
    outs, saved = saved_during(lambda: activation_backward_op(kind, *leaves))
    assert [t.data_ptr() for t in saved] == [t.data_ptr() for t in leaves]
    outs = outs if isinstance(outs, tuple) else (outs,)
    torch.autograd.grad(outs, leaves, bars)
    assert spy == [kind]


# ---------------------------------------------------------------- the backend choice


@pytest.mark.parametrize("kind", ACTIVATIONS)
def test_public_function_chooses_the_kernel(kind, spy):
    dy, pre, bars = make_inputs(kind, (3, 50), torch.float32, seed=17)
    by_kernel = activation_double_backward(kind, dy, pre, bars, backend="kernel")
    assert spy == [kind]
    auto = activation_double_backward(kind, dy, pre, bars)
    assert spy == [kind, kind] and all(torch.equal(a, b) for a, b in zip(auto, by_kernel))
    by_twin = activation_double_backward(kind, dy, pre, bars, backend="reference")
    assert spy == [kind, kind]
    assert all(torch.equal(a, b) for a, b in zip(by_twin, activation_double_backward_reference(kind, dy, pre, bars)))
    # the op with "reference": the twin, never the kernel
    _op_double_backward(kind, dy, pre, bars, "reference")
    assert spy == [kind, kind]


def test_float64_kernel_raises_and_auto_warns(monkeypatch, spy):
    dy, pre, bars = make_inputs("swiglu", (3, 8), torch.float64, seed=19)
    with pytest.raises(RuntimeError, match="float64"):
        activation_double_backward("swiglu", dy, pre, bars, backend="kernel")
    with pytest.warns(UserWarning, match="activation_double_backward.*float64"):
        got = activation_double_backward("swiglu", dy, pre, bars)
    assert spy == []
    assert all(torch.equal(a, b) for a, b in zip(got, activation_double_backward_reference("swiglu", dy, pre, bars)))
    with pytest.raises(RuntimeError, match="float64"):  # the op: geglu's first-order Triton kernel refuses first
        activation_backward_op("geglu_tanh", dy, *pre, backend="kernel")


@pytest.mark.parametrize("kind", ACTIVATIONS)
def test_without_interpreter_on_cpu(kind, monkeypatch, spy):
    dy, pre, bars = make_inputs(kind, (3, 8), torch.float32, seed=23)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        activation_double_backward(kind, dy, pre, bars, backend="kernel")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the twin by design on the CPU: no warning
        got = activation_double_backward(kind, dy, pre, bars)
        _, op_got = _op_double_backward(kind, dy, pre, bars, "auto")
    want = activation_double_backward_reference(kind, dy, pre, bars)
    assert spy == []
    assert all(torch.equal(a, b) for a, b in zip(got, want)) and all(torch.equal(a, b) for a, b in zip(op_got, want))


def test_bfloat16_on_cpu_takes_the_twin(monkeypatch, spy):
    if torch.cuda.is_available():
        pytest.skip("the interpreter is off where a GPU is present")
    dy, pre, bars = make_inputs("geglu_tanh", (3, 8), torch.bfloat16, seed=29)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = activation_double_backward("geglu_tanh", dy, pre, bars)
    assert spy == [] and got[0].dtype == torch.bfloat16
    assert all(torch.equal(a, b) for a, b in zip(got, activation_double_backward_reference("geglu_tanh", dy, pre,
                                                                                           bars)))
    with pytest.raises(RuntimeError, match="bfloat16"):
        activation_double_backward("geglu_tanh", dy, pre, bars, backend="kernel")


@pytest.mark.parametrize("call, match", [
    (lambda x: activation_double_backward("swiglu", x, (x, x), (x,)), "'swiglu' takes 2 cotangent"),
    (lambda x: activation_double_backward("gelu", x, (x,), (x[:2],)), r"grads_bar\[0\] \(of dx\)"),
    (lambda x: activation_double_backward("geglu_tanh", x, (x, x), (None, x.half())), r"grads_bar\[1\].*float16"),
    (lambda x: activation_double_backward("relu", x, (x,), (x,)), "'relu'"),
    (lambda x: activation_double_backward("gelu", x, (x,), (x,), backend="triton"), "backend"),
    (lambda x: activation_op("gelu", x, backend="fastest"), "backend"),
    (lambda x: activation_backward_op("gelu", x, x, backend="cuda"), "backend")])
def test_bad_arguments(call, match):
    with pytest.raises(ValueError, match=match):
        call(torch.ones(3, 7))


# ---------------------------------------------------------------- GPU (H100 / H200)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("kind", ACTIVATIONS)
def test_gpu_kernel_matches_float64(kind, dtype):
    dy, pre, bars = make_inputs(kind, (4096, 3072), dtype, seed=31, device="cuda")
    for case in bar_cases(kind, bars)[:-1][:2]:  # every cotangent given; (gated kinds) the first one None
        got = activation_double_backward(kind, dy, pre, case, backend="kernel")
        assert_close(got, float64_twin(kind, dy, pre, case), (dy, *pre), dtype,
                     lambda: plain_torch(kind, dy, pre, case))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("kind", ACTIVATIONS)
def test_gpu_op_end_to_end_with_backend_kernel(kind, dtype, spy):
    from gradmem_fast import _ext

    if kind != "geglu_tanh" and _ext.reason() is not None:
        pytest.skip(f"the first-order kernels of {kind} are the CUDA extension's: {_ext.reason()}")
    dy, pre, bars = make_inputs(kind, (4096, 3072), dtype, seed=37, device="cuda")
    outs, got = _op_double_backward(kind, dy, pre, bars, "kernel")
    assert spy == [kind]
    assert_close(got, float64_twin(kind, dy, pre, bars), (dy, *pre), dtype, lambda: plain_torch(kind, dy, pre, bars))
    first = activation_backward_reference(kind, dy.double(), *(t.double() for t in pre))
    assert_close(outs, first if isinstance(first, tuple) else (first,), pre, dtype)
