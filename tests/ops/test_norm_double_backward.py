"""The norm ops and their written-out double backward: gradcheck / gradgradcheck in float64, agreement with
autograd differentiating the first-order twins (add_norm.py, qk_norm.py), low-precision values and dtypes,
what the autograd nodes save, and argument checks."""
import itertools

import pytest
import torch

from gradmem_fast.ops.add_norm import add_norm_backward_reference, add_norm_forward_reference
from gradmem_fast.ops.norm_double_backward import (add_norm_backward_op, add_norm_double_backward_reference,
                                                   add_norm_op, qk_norm_backward_op,
                                                   qk_norm_double_backward_reference, qk_norm_op)
from gradmem_fast.ops.qk_norm import qk_norm_backward_reference, qk_norm_forward_reference
from helpers import rel_err, saved_during

KINDS = ("rms", "layer")
EPS = 1e-5
ADD_SHAPES = [(5, 6), (2, 3, 6)]
QK_SHAPES = [((2, 3, 4, 5), (4, 5)), ((3, 1, 8), (1, 8))]


def _rand(*shape, seed, dtype=torch.float64, grad=True, shift=0.3):
    g = torch.Generator().manual_seed(seed)
    t = (torch.randn(*shape, generator=g, dtype=torch.float64) + shift).to(dtype)
    return t.requires_grad_(grad)


def _add_inputs(shape, seed=0, dtype=torch.float64, w_dtype=None, grad=True):
    """(x, residual, weight, bias), or as (dy, residual_out, weight, _); seeds seed .. seed + 3."""
    d = shape[-1]
    w_dtype = w_dtype or dtype
    return (_rand(*shape, seed=seed, dtype=dtype, grad=grad), _rand(*shape, seed=seed + 1, dtype=dtype, grad=grad),
            _rand(d, seed=seed + 2, dtype=w_dtype, grad=grad), _rand(d, seed=seed + 3, dtype=w_dtype, grad=grad))


# ---------------------------------------------------------------- float64: gradcheck and gradgradcheck


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", ADD_SHAPES)
def test_gradcheck_and_third_derivative_of_add_norm_backward_op(kind, shape):
    dy, h, w, _ = _add_inputs(shape, seed=1)
    fn = lambda *a: add_norm_backward_op(*a, EPS, kind)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (dy, h, w))
    assert torch.autograd.gradgradcheck(fn, (dy, h, w))  # the written double backward, differentiated again


@pytest.mark.parametrize("kind", KINDS)
def test_add_norm_backward_op_with_a_residual_gradient(kind):
    # d_residual_out is added before the one rounding, as add_norm_backward_reference adds it
    dy, h, w, _ = _add_inputs((5, 6), seed=11)
    d_res = _rand(5, 6, seed=15)
    fn = lambda dy, h, w, d_res: add_norm_backward_op(dy, h, w, EPS, kind, d_res)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (dy, h, w, d_res))
    assert torch.autograd.gradgradcheck(fn, (dy, h, w, d_res))
    for dtype in (torch.float32, torch.float16):
        args = [t.detach().to(dtype) for t in (dy, h, w, d_res)]
        stats = add_norm_forward_reference(args[1], None, args[2], None, EPS, kind)[2]
        assert torch.equal(add_norm_backward_op(*args[:3], EPS, kind, args[3]),
                           add_norm_backward_reference(args[0], args[3], args[1], args[2], stats, kind))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", ADD_SHAPES)
@pytest.mark.parametrize("with_res,with_bias", list(itertools.product((False, True), repeat=2)))
def test_gradgradcheck_of_add_norm_op(kind, shape, with_res, with_bias):
    x, res, w, b = _add_inputs(shape, seed=2)

    def fn(x, res, w, b):
        y, res_out, _ = add_norm_op(x, res if with_res else None, w, b if with_bias else None, EPS, kind)
        return y, res_out

    assert torch.autograd.gradcheck(fn, (x, res, w, b))
    assert torch.autograd.gradgradcheck(fn, (x, res, w, b))


@pytest.mark.parametrize("x_shape,w_shape", QK_SHAPES)
def test_gradcheck_of_qk_norm_ops(x_shape, w_shape):
    dy, x, w = _rand(*x_shape, seed=3), _rand(*x_shape, seed=4), _rand(*w_shape, seed=5)
    fn = lambda *a: qk_norm_backward_op(*a, EPS)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (dy, x, w))
    assert torch.autograd.gradgradcheck(fn, (dy, x, w))
    assert torch.autograd.gradgradcheck(lambda x, w: qk_norm_op(x, w, EPS)[0], (x, w))


# ---------------------------------------------------------------- float64: against autograd of the twins


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", ADD_SHAPES)
def test_add_norm_double_backward_matches_autograd_of_the_twins(kind, shape):
    dy, h, w, _ = _add_inputs(shape, seed=6)
    g_dx = _rand(*shape, seed=50, grad=False, shift=0.0)
    stats = add_norm_forward_reference(h, None, w, None, EPS, kind)[2]  # differentiable in h
    dx = add_norm_backward_reference(dy, None, h, w, stats, kind)
    want = torch.autograd.grad(dx, (dy, h, w), g_dx)
    got = add_norm_double_backward_reference(dy, h, w, EPS, kind, g_dx)
    for a, b in zip(got, want):
        assert a.shape == b.shape and rel_err(a, b) < 1e-12
    op_got = torch.autograd.grad(add_norm_backward_op(dy, h, w, EPS, kind), (dy, h, w), g_dx)
    for a, b in zip(op_got, want):
        assert rel_err(a, b) < 1e-12


@pytest.mark.parametrize("x_shape,w_shape", QK_SHAPES)
def test_qk_norm_double_backward_matches_autograd_of_the_twins(x_shape, w_shape):
    dy, x, w = _rand(*x_shape, seed=8), _rand(*x_shape, seed=9), _rand(*w_shape, seed=10)
    g_dx = _rand(*x_shape, seed=11, grad=False, shift=0.0)
    _, rstd = qk_norm_forward_reference(x, w, EPS)
    want = torch.autograd.grad(qk_norm_backward_reference(dy, x, w, rstd), (dy, x, w), g_dx)
    got = qk_norm_double_backward_reference(dy, x, w, EPS, g_dx)
    for a, b in zip(got, want):
        assert a.shape == b.shape and rel_err(a, b) < 1e-12
    op_got = torch.autograd.grad(qk_norm_backward_op(dy, x, w, EPS), (dy, x, w), g_dx)
    for a, b in zip(op_got, want):
        assert rel_err(a, b) < 1e-12


@pytest.mark.parametrize("kind", KINDS)
def test_add_norm_op_gradients_and_non_differentiable_stats(kind):
    x, res, w, b = _add_inputs((2, 3, 6), seed=12)
    y, res_out, stats = add_norm_op(x, None, w, b, EPS, kind)
    assert not stats.requires_grad and torch.equal(res_out, x)
    dy, dr = _rand(2, 3, 6, seed=60, grad=False), _rand(2, 3, 6, seed=61, grad=False)
    got = torch.autograd.grad((y, res_out), (x, w, b), (dy, dr))
    y_ref, res_ref, _ = add_norm_forward_reference(x, None, w, b, EPS, kind)
    want = torch.autograd.grad((y_ref, res_ref), (x, w, b), (dy, dr))
    for a, c in zip(got, want):
        assert rel_err(a, c) < 1e-12


# ---------------------------------------------------------------- float32 / float16


# Inputs rounded to fp16 are exact in float64, so the float64 twin on the same values is the true result to
# ~1e-16. The op computes in float32 (error ~1e-6 relative) and rounds each output once to fp16: at most
# half an fp16 ulp, 2**-11 ~ 4.9e-4 of the largest entry. 2e-3 leaves a factor of 4; fp32 outputs carry
# float32 rounding of a few reductions over d, ~1e-6, under the 1e-5 bound.
BOUND = {torch.float32: 1e-5, torch.float16: 2e-3}


@pytest.mark.parametrize("dtype", (torch.float32, torch.float16))
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("w_dtype", (None, torch.float32))
def test_add_norm_low_precision(dtype, kind, w_dtype):
    x, res, w, b = _add_inputs((4, 3, 16), seed=15, dtype=dtype, w_dtype=w_dtype, grad=False)
    out, ref = add_norm_op(x, res, w, b, EPS, kind), add_norm_forward_reference(x, res, w, b, EPS, kind)
    for a, c in zip(out, ref):
        assert a.dtype == c.dtype and torch.equal(a, c)
    dy, g_dx = _rand(4, 3, 16, seed=70, dtype=dtype, grad=False), _rand(4, 3, 16, seed=71, dtype=dtype, grad=False)
    h = out[1]
    assert torch.equal(add_norm_backward_op(dy, h, w, EPS, kind),
                       add_norm_backward_reference(dy, None, h, w, out[2], kind))
    got = add_norm_double_backward_reference(dy, h, w, EPS, kind, g_dx)
    want = add_norm_double_backward_reference(dy.double(), h.double(), w.double(), EPS, kind, g_dx.double())
    for a, c, t in zip(got, want, (dy, h, w)):
        assert a.dtype == t.dtype and rel_err(a, c) < BOUND[dtype]
    # the op's own gradients: in each input's dtype, close to float64
    leaves = [t.clone().requires_grad_(True) for t in (x, res, w, b)]
    grads = torch.autograd.grad(add_norm_op(*leaves, EPS, kind)[0], leaves, dy)
    leaves64 = [t.double().requires_grad_(True) for t in (x, res, w, b)]
    grads64 = torch.autograd.grad(add_norm_op(*leaves64, EPS, kind)[0], leaves64, dy.double())
    for a, c, t in zip(grads, grads64, leaves):
        assert a.dtype == t.dtype and rel_err(a, c) < BOUND[dtype]


@pytest.mark.parametrize("dtype", (torch.float32, torch.float16))
def test_qk_norm_low_precision(dtype):
    x, w = _rand(2, 3, 4, 8, seed=18, dtype=dtype, grad=False), _rand(4, 8, seed=19, grad=False, dtype=torch.float32)
    # the twins' values exactly (under the Triton interpreter "auto" takes the first-order Triton kernels)
    y, rstd = qk_norm_op(x, w, EPS, backend="reference")
    y_ref, rstd_ref = qk_norm_forward_reference(x, w, EPS)
    assert torch.equal(y, y_ref) and torch.equal(rstd, rstd_ref) and not rstd.requires_grad
    dy, g_dx = _rand(*x.shape, seed=20, dtype=dtype, grad=False), _rand(*x.shape, seed=21, dtype=dtype, grad=False)
    assert torch.equal(qk_norm_backward_op(dy, x, w, EPS, backend="reference"),
                       qk_norm_backward_reference(dy, x, w, rstd_ref))
    got = qk_norm_double_backward_reference(dy, x, w, EPS, g_dx)
    want = qk_norm_double_backward_reference(dy.double(), x.double(), w.double(), EPS, g_dx.double())
    for a, c, t in zip(got, want, (dy, x, w)):
        assert a.dtype == t.dtype and rel_err(a, c) < BOUND[dtype]


# ---------------------------------------------------------------- what the nodes save


@pytest.mark.parametrize("kind", KINDS)
def test_add_norm_backward_op_saves_only_its_inputs(kind):
    dy, h, w, _ = _add_inputs((5, 6), seed=22)
    dx, saved = saved_during(lambda: add_norm_backward_op(dy, h, w, EPS, kind))
    assert len(saved) == 3
    assert [t.data_ptr() for t in saved] == [dy.data_ptr(), h.data_ptr(), w.data_ptr()]
    assert [tuple(t.shape) for t in dx.grad_fn.saved_tensors] == [(5, 6), (5, 6), (6,)]


def test_qk_norm_backward_op_saves_only_its_inputs():
    dy, x, w = _rand(2, 3, 4, 5, seed=23), _rand(2, 3, 4, 5, seed=24), _rand(4, 5, seed=25)
    _, saved = saved_during(lambda: qk_norm_backward_op(dy, x, w, EPS))
    assert [t.data_ptr() for t in saved] == [dy.data_ptr(), x.data_ptr(), w.data_ptr()]


# ---------------------------------------------------------------- argument checks


def _add_args(**bad):
    x, res, w, b = _add_inputs((5, 6), seed=26, grad=False)
    args = dict(x=x, residual=res, weight=w, bias=b, eps=EPS, kind="rms")
    args.update(bad)
    return args


@pytest.mark.parametrize("bad, match", [
    (dict(kind="batch"), "'batch'"), (dict(eps=0.0), r"eps.*0\.0"), (dict(eps=-1.0), r"eps.*-1\.0"),
    (dict(eps=float("nan")), "eps.*nan"), (dict(eps=float("inf")), "eps.*inf"),
    (dict(weight=torch.ones(5, dtype=torch.float64)), r"weight.*\(5,\)"),
    (dict(bias=torch.ones(7, dtype=torch.float64)), r"bias.*\(7,\)"),
    (dict(residual=torch.ones(5, 6, dtype=torch.float32)), "residual.*float32"),
    (dict(residual=torch.ones(5, 7, dtype=torch.float64)), r"residual.*\(5, 7\)"),
    (dict(weight=torch.ones(6, dtype=torch.int64)), "weight.*int64")])
def test_add_norm_op_bad_arguments(bad, match):
    with pytest.raises(ValueError, match=match):
        add_norm_op(**_add_args(**bad))


@pytest.mark.parametrize("bad, match", [
    (dict(dy=torch.ones(5, 7, dtype=torch.float64)), r"dy.*\(5, 7\)"),
    (dict(dy=torch.ones(5, 6, dtype=torch.float16)), "dy.*float16"),
    (dict(kind="group"), "'group'"), (dict(eps=0), "eps.*0"),
    (dict(weight=torch.ones(2, 3, dtype=torch.float64)), r"weight.*\(2, 3\)")])
def test_add_norm_backward_op_bad_arguments(bad, match):
    args = dict(dy=torch.ones(5, 6, dtype=torch.float64), residual_out=torch.ones(5, 6, dtype=torch.float64),
                weight=torch.ones(6, dtype=torch.float64), eps=EPS, kind="layer")
    args.update(bad)
    with pytest.raises(ValueError, match=match):
        add_norm_backward_op(**args)


@pytest.mark.parametrize("bad, match", [
    (dict(weight=torch.ones(5, 4)), r"weight.*\(4, 5\).*\(5, 4\)"), (dict(weight=torch.ones(5)), r"weight.*\(5,\)"),
    (dict(x=torch.ones(5)), r"x.*\(5,\)"), (dict(eps=-2.0), r"eps.*-2\.0"),
    (dict(dy=torch.ones(3, 4, 5, dtype=torch.float64)), "dy.*float64"),
    (dict(dy=torch.ones(3, 4, 6)), r"dy.*\(3, 4, 6\)")])
def test_qk_norm_bad_arguments(bad, match):
    args = dict(dy=torch.ones(3, 4, 5), x=torch.ones(3, 4, 5), weight=torch.ones(4, 5), eps=EPS)
    args.update(bad)
    with pytest.raises(ValueError, match=match):
        qk_norm_backward_op(**args)
    if "dy" not in bad:
        del args["dy"]
        with pytest.raises(ValueError, match=match):
            qk_norm_op(**args)


def test_weight_of_another_dtype_is_accepted_and_gets_its_gradient_in_its_dtype():
    x = _rand(3, 2, 4, 8, seed=27, dtype=torch.float16)
    w = _rand(2, 4, 8, seed=28, dtype=torch.bfloat16)[0].detach().requires_grad_(True)
    y, _ = qk_norm_op(x, w, EPS)
    dx, dw = torch.autograd.grad(y.float().square().sum(), (x, w))
    assert dx.dtype == torch.float16 and dw.dtype == torch.bfloat16 and dw.shape == (4, 8)
    assert dw.abs().sum() > 0 and dx.abs().sum() > 0


@pytest.mark.parametrize("kind", KINDS)
def test_backward_ops_reuse_the_forward_statistics(kind, monkeypatch):
    # stats / rstd handed over from the forward op: no second forward call, the same values and derivatives
    import gradmem_fast.ops.norm_double_backward as ndb

    x, _, w, _ = _add_inputs((5, 6), seed=40)
    dy, u = _rand(5, 6, seed=44), _rand(5, 6, seed=45)
    _, h, stats = add_norm_op(x, None, w, None, EPS, kind)
    xq, wq = _rand(3, 4, 5, seed=46), _rand(4, 5, seed=47)
    dyq, uq = _rand(3, 4, 5, seed=48), _rand(3, 4, 5, seed=49)
    _, rstd = qk_norm_op(xq, wq, EPS)
    want = [torch.autograd.grad(add_norm_backward_op(dy, h, w, EPS, kind), (dy, x, w), u, retain_graph=True),
            torch.autograd.grad(qk_norm_backward_op(dyq, xq, wq, EPS), (dyq, xq, wq), uq)]
    calls = []
    for name in ("add_norm_forward", "qk_norm_forward"):
        monkeypatch.setattr(ndb, name, lambda *a, _n=name, **k: calls.append(_n))
    got = [torch.autograd.grad(add_norm_backward_op(dy, h, w, EPS, kind, stats=stats), (dy, x, w), u),
           torch.autograd.grad(qk_norm_backward_op(dyq, xq, wq, EPS, rstd=rstd), (dyq, xq, wq), uq)]
    assert not calls
    for g, w_ in zip(got, want):
        for a, b in zip(g, w_):
            assert torch.equal(a, b)
