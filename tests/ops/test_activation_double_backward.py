"""The activation ops and their written-out double backward: gradcheck / gradgradcheck in float64, agreement
with autograd differentiating the first-order twins (activation.py, geglu.py), low-precision values and
dtypes, what the autograd nodes save, and argument checks."""
import pytest
import torch

from gradmem_fast.engine.ops import Ops
from gradmem_fast.ops.activation_double_backward import (ACTIVATIONS, activation_backward_op,
                                                         activation_backward_reference,
                                                         activation_double_backward_reference,
                                                         activation_forward_reference, activation_op)
from helpers import rel_err, saved_during

GATED = ("swiglu", "geglu_tanh")
SHAPES = [(3, 7), (2, 3, 5)]
SCALES = (1.0, 3.0)  # 3: pre-activations out to ~+-9, where tanh and sigmoid saturate


def _rand(shape, seed, dtype=torch.float64, grad=True, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(*shape, generator=g, dtype=torch.float64)).to(dtype).requires_grad_(grad)


def _pre(kind, shape, seed, scale=1.0, **kw):
    n = 2 if kind in GATED else 1
    return tuple(_rand(shape, seed + i, scale=scale, **kw) for i in range(n))


def _as_tuple(x):
    return x if isinstance(x, tuple) else (x,)


# Under backend "auto" the float64 calls here warn that geglu's and the double backward's Triton kernels refuse
# float64 (once per process): expected here, and a fresh record per test keeps them from using up another
# module's first warning.
pytestmark = pytest.mark.filterwarnings("ignore:.*Triton kernel cannot run \\(dtype torch.float64:UserWarning")


# ---------------------------------------------------------------- float64: gradcheck and gradgradcheck


@pytest.mark.parametrize("kind", ACTIVATIONS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("scale", SCALES)
def test_gradcheck_and_third_derivative_of_activation_backward_op(kind, shape, scale):
    dy, pre = _rand(shape, 1), _pre(kind, shape, 2, scale)
    fn = lambda dy, *pre: activation_backward_op(kind, dy, *pre)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (dy, *pre))
    assert torch.autograd.gradgradcheck(fn, (dy, *pre))  # the written double backward, differentiated again


@pytest.mark.parametrize("kind", ACTIVATIONS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("scale", SCALES)
def test_gradgradcheck_of_activation_op(kind, shape, scale):
    pre = _pre(kind, shape, 5, scale)
    fn = lambda *pre: activation_op(kind, *pre)  # noqa: E731
    assert torch.autograd.gradcheck(fn, pre)
    assert torch.autograd.gradgradcheck(fn, pre)


# ---------------------------------------------------------------- float64: against autograd of the twins


def _bars_cases(kind, shape):
    """Cotangents of the backward's outputs: all given, and (gated kinds) each one None in turn."""
    a, b = _rand(shape, 40, grad=False), _rand(shape, 41, grad=False)
    return [(a, b), (None, b), (a, None)] if kind in GATED else [(a,)]


@pytest.mark.parametrize("kind", ACTIVATIONS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("scale", SCALES)
def test_double_backward_matches_autograd_of_the_twins(kind, shape, scale):
    dy, pre = _rand(shape, 7), _pre(kind, shape, 8, scale)
    inputs = (dy, *pre)
    for bars in _bars_cases(kind, shape):
        given = [i for i, g in enumerate(bars) if g is not None]
        grads = _as_tuple(activation_backward_reference(kind, dy, *pre))
        want = torch.autograd.grad([grads[i] for i in given], inputs, [bars[i] for i in given],
                                   allow_unused=True, materialize_grads=True)
        got = activation_double_backward_reference(kind, dy, pre, bars)
        assert len(got) == len(inputs)
        for a, c in zip(got, want):
            assert a.shape == c.shape and a.dtype == c.dtype and rel_err(a, c) < 1e-12
        # through the op: autograd passes None for the outputs that are not used
        outs = _as_tuple(activation_backward_op(kind, dy, *pre))
        op_got = torch.autograd.grad([outs[i] for i in given], inputs, [bars[i] for i in given])
        for a, c in zip(op_got, want):
            assert rel_err(a, c) < 1e-12
    assert want[1].abs().max() > 0  # the second derivative through the pre-activation is not trivially 0


@pytest.mark.parametrize("kind", ACTIVATIONS)
def test_ops_take_the_values_of_the_twins_and_the_engine_names(kind):
    dy, pre = _rand((4, 6), 9, grad=False), _pre(kind, (4, 6), 10, 2.0, grad=False)
    engine_pre = pre if kind in GATED else pre[0]
    y = activation_op(kind, *pre)
    assert torch.equal(y, activation_forward_reference(kind, *pre))
    assert torch.equal(y, Ops("reference").activation_forward(kind, engine_pre))
    for a, c in zip(_as_tuple(activation_backward_op(kind, dy, *pre)),
                    _as_tuple(Ops("reference").activation_backward(kind, dy, engine_pre))):
        assert torch.equal(a, c)


# ---------------------------------------------------------------- float32 / float16 / bfloat16


# Inputs rounded to 16 bits are exact in float64, so the float64 twin on the same values is the true result
# to ~1e-16. The op computes in float32 (a handful of elementwise roundings, ~1e-6 of the largest entry,
# sech^2 evaluated without cancellation) and rounds each output once to the 16-bit dtype: at most half an
# ulp of the entry, 2**-11 ~ 4.9e-4 (fp16) or 2**-8 ~ 3.9e-3 (bf16) of the largest entry. The bounds leave a
# factor of 4. fp32 outputs carry only the float32 roundings, ~1e-6, under the 1e-5 bound.
BOUND = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


@pytest.mark.parametrize("dtype", (torch.float32, torch.float16, torch.bfloat16))
@pytest.mark.parametrize("kind", ACTIVATIONS)
def test_low_precision(dtype, kind):
    shape = (6, 40)
    dy, pre = _rand(shape, 11, dtype, grad=False), _pre(kind, shape, 12, 3.0, dtype=dtype, grad=False)
    # backend "reference": the twins' own values (test_activation_double_backward_kernel checks the kernels)
    y = activation_op(kind, *pre, backend="reference")
    assert y.dtype == dtype and torch.equal(y, activation_forward_reference(kind, *pre))
    grads = _as_tuple(activation_backward_op(kind, dy, *pre, backend="reference"))
    for a, c, t in zip(grads, _as_tuple(activation_backward_reference(kind, dy, *pre)), pre):
        assert a.dtype == t.dtype and torch.equal(a, c)
    # first order through activation_op: the twin's backward values
    leaves = [t.clone().requires_grad_(True) for t in pre]
    for a, c in zip(torch.autograd.grad(activation_op(kind, *leaves, backend="reference"), leaves, dy), grads):
        assert torch.equal(a, c)
    bars = tuple(_rand(shape, 20 + i, dtype, grad=False) for i in range(len(grads)))
    got = activation_double_backward_reference(kind, dy, pre, bars)
    want = activation_double_backward_reference(kind, dy.double(), tuple(t.double() for t in pre),
                                                tuple(b.double() for b in bars))
    for a, c, t in zip(got, want, (dy, *pre)):
        assert a.dtype == t.dtype and rel_err(a, c) < BOUND[dtype]
    # the same values through the op's autograd node, in the input dtypes
    leaves = [t.clone().requires_grad_(True) for t in (dy, *pre)]
    op_got = torch.autograd.grad(activation_backward_op(kind, *leaves, backend="reference"), leaves, bars)
    for a, c in zip(op_got, got):
        assert a.dtype == c.dtype and torch.equal(a, c)


@pytest.mark.parametrize("kind", ("gelu_tanh", "geglu_tanh"))
def test_tanh_gelu_second_derivative_is_accurate_in_the_tails_in_float32(kind):
    # with dy = 1 and the d_gate / dx cotangent 1 (up = 1), the gate's cotangent is f''(x). Written with
    # 1 - tanh(u)^2, float32 rounding of tanh near +-1, times x u'^2, costs ~5e-6 of max |f''| near |x| = 5;
    # sech^2 from sigmoids keeps it at ~3e-7.
    x = torch.linspace(-12.0, 12.0, 4001, dtype=torch.float64)
    one = torch.ones_like(x)
    pre = (x, one) if kind in GATED else (x,)
    bars = (one, None) if kind in GATED else (one,)
    got = activation_double_backward_reference(kind, one.float(), tuple(t.float() for t in pre), bars)[1]
    want = activation_double_backward_reference(kind, one, pre, bars)[1]
    assert got.dtype == torch.float32 and rel_err(got, want) < 1e-6


# ---------------------------------------------------------------- what the nodes save


@pytest.mark.parametrize("kind", ACTIVATIONS)
def test_nodes_save_only_their_inputs(kind):
    dy, pre = _rand((5, 6), 30), _pre(kind, (5, 6), 31)
    _, saved = saved_during(lambda: activation_backward_op(kind, dy, *pre))
    assert [t.data_ptr() for t in saved] == [t.data_ptr() for t in (dy, *pre)]
    _, saved = saved_during(lambda: activation_op(kind, *pre))
    assert [t.data_ptr() for t in saved] == [t.data_ptr() for t in pre]
    # the hook does see intermediates: autograd through the twin saves more than its inputs
    _, saved = saved_during(lambda: activation_backward_reference(kind, dy, *pre))
    assert len(saved) > 1 + len(pre)


# ---------------------------------------------------------------- argument checks


def _t(*shape, dtype=torch.float32, device="cpu"):
    return torch.ones(*shape, dtype=dtype, device=device)


@pytest.mark.parametrize("args, match", [
    (("relu", _t(3, 7)), "'relu'"),
    (("swiglu", _t(3, 7)), "'swiglu' takes 2.*got 1"),
    (("gelu", _t(3, 7), _t(3, 7)), "'gelu' takes 1.*got 2"),
    (("geglu_tanh", _t(3, 7), _t(3, 8)), r"up.*\(3, 8\).*gate.*\(3, 7\)"),
    (("swiglu", _t(3, 7), _t(3, 7, dtype=torch.float16)), "up.*float16"),
    (("swiglu", _t(3, 7), _t(3, 7, device="meta")), "up.*meta"),
    (("gelu_tanh", _t(3, 7, dtype=torch.int64)), "x.*int64"),
    (("gelu", [1.0, 2.0]), "x.*list")])
def test_activation_op_bad_arguments(args, match):
    with pytest.raises(ValueError, match=match):
        activation_op(*args)


@pytest.mark.parametrize("kind, dy, match", [
    ("swiglu", _t(3, 6), r"dy.*\(3, 6\)"), ("geglu_tanh", _t(3, 7, dtype=torch.float64), "dy.*float64"),
    ("gelu", _t(3, 7, device="meta"), "dy.*meta"), ("gelu_tanh", _t(3, 7, dtype=torch.int32), "dy.*int32"),
    ("silu", _t(3, 7), "'silu'")])
def test_activation_backward_op_bad_arguments(kind, dy, match):
    pre = (_t(3, 7), _t(3, 7)) if kind in GATED else (_t(3, 7),)
    with pytest.raises(ValueError, match=match):
        activation_backward_op(kind, dy, *pre)
