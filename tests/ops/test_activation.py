import pytest
import torch
import torch.nn.functional as F

from gradmem_fast.ops.activation import (gelu_backward, gelu_backward_reference, gelu_forward,
                                         gelu_forward_reference, swiglu_backward, swiglu_backward_reference,
                                         swiglu_forward, swiglu_forward_reference)
from helpers import poison_, rel_err


def _t(shape, dtype, device="cpu", seed=0, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(shape, generator=g, dtype=torch.float64)).to(device, dtype)


# ---------------------------------------------------------------- twins on CPU, float64


@pytest.mark.parametrize("shape", [(1,), (37, 48), (2, 5, 257)])
def test_swiglu_reference(shape):
    gate, up, dy = _t(shape, torch.float64, seed=1), _t(shape, torch.float64, seed=2), _t(shape, torch.float64, seed=3)
    assert rel_err(swiglu_forward_reference(gate, up), F.silu(gate) * up) < 1e-15
    ga, ua = gate.clone().requires_grad_(), up.clone().requires_grad_()
    dg, du = torch.autograd.grad(F.silu(ga) * ua, (ga, ua), dy)
    d_gate, d_up = swiglu_backward_reference(dy, gate, up)
    assert rel_err(d_gate, dg) < 1e-13 and rel_err(d_up, du) < 1e-13


@pytest.mark.parametrize("approximate", ["tanh", "none"])
@pytest.mark.parametrize("shape", [(1,), (37, 48), (2, 5, 257)])
def test_gelu_reference(approximate, shape):
    x, dy = _t(shape, torch.float64, seed=4), _t(shape, torch.float64, seed=5)
    assert rel_err(gelu_forward_reference(x, approximate), F.gelu(x, approximate=approximate)) < 1e-14
    xa = x.clone().requires_grad_()
    (gx,) = torch.autograd.grad(F.gelu(xa, approximate=approximate), xa, dy)
    assert rel_err(gelu_backward_reference(dy, x, approximate), gx) < 1e-13


def test_public_cpu_out_and_errors():
    gate, up = _t((4, 48), torch.float32, seed=6), _t((4, 48), torch.float32, seed=7)
    out = poison_(torch.empty_like(gate))
    assert swiglu_forward(gate, up, out=out) is out
    assert torch.equal(out, swiglu_forward_reference(gate, up))
    d = (poison_(torch.empty_like(gate)), poison_(torch.empty_like(gate)))
    d_gate, d_up = swiglu_backward(up, gate, up, out=d)
    assert d_gate is d[0] and torch.equal(d_up, swiglu_backward_reference(up, gate, up)[1])
    dx = gelu_backward(up, gate, "none", out=poison_(torch.empty_like(gate)))
    assert torch.equal(dx, gelu_backward_reference(up, gate, "none"))
    with pytest.raises(ValueError, match="approximate"):
        gelu_forward(gate, "erf")
    with pytest.raises(ValueError, match="up"):
        swiglu_forward(gate, up[:, :3])
    with pytest.raises(ValueError, match="dy"):
        swiglu_backward(up.half(), gate, up)
    with pytest.raises(ValueError, match="out"):
        gelu_forward(gate, "tanh", out=torch.empty(3))
    with pytest.raises(RuntimeError, match="cpu"):
        gelu_forward(gate, "tanh", backend="kernel")


# ---------------------------------------------------------------- csrc kernels, GPU only

SIZES = [(1, 48), (1037, 80), (16, 768), (8, 2050), (4, 8192)]


def _check(dtype, factor, fp32_tol, out, out64, plain):
    if dtype == torch.float32:
        assert rel_err(out, out64) < fp32_tol
    else:
        assert rel_err(out, out64) <= factor * rel_err(plain, out64) + 1e-6


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,factor,fp32_tol", [(torch.float32, None, 1e-5), (torch.bfloat16, 2.0, None),
                                                   (torch.float16, 2.0, None)])
@pytest.mark.parametrize("rows,d", SIZES)
@pytest.mark.parametrize("offset", [0, 1])  # 1: misaligned views, the scalar path
def test_swiglu_kernel(dtype, factor, fp32_tol, rows, d, offset):
    n = rows * d
    gate, up, dy = (_t(n + 1, dtype, "cuda", seed=d + i)[offset: offset + n].view(rows, d) for i in range(3))
    check_swiglu(gate, up, dy, dtype, factor, fp32_tol, 1e-6 if dtype == torch.float32 else 2 ** -7)


def check_swiglu(gate, up, dy, dtype, factor, fp32_tol, twin_tol):
    """The SwiGLU kernel against float64 autograd (16-bit: within `factor` of the plain PyTorch error) and its
    twin (within twin_tol). Shared with the emulated tests (tests/csrc_emulation)."""
    y = swiglu_forward(gate, up, out=poison_(torch.empty_like(gate)), backend="kernel")
    d_gate, d_up = swiglu_backward(dy, gate, up, out=(poison_(torch.empty_like(gate)), poison_(torch.empty_like(gate))),
                                   backend="kernel")
    g64, u64, dy64 = gate.double().requires_grad_(), up.double().requires_grad_(), dy.double()
    y64 = F.silu(g64) * u64
    dg64, du64 = torch.autograd.grad(y64, (g64, u64), dy64)
    gp, upp = gate.clone().requires_grad_(), up.clone().requires_grad_()
    yp = F.silu(gp) * upp  # the plain PyTorch computation in the same dtype
    dgp, dup = torch.autograd.grad(yp, (gp, upp), dy)
    _check(dtype, factor, fp32_tol, y, y64, yp)
    _check(dtype, factor, fp32_tol, d_gate, dg64, dgp)
    _check(dtype, factor, fp32_tol, d_up, du64, dup)
    rg, ru = swiglu_backward_reference(dy, gate, up)
    assert rel_err(y, swiglu_forward_reference(gate, up)) <= twin_tol
    assert rel_err(d_gate, rg) <= twin_tol and rel_err(d_up, ru) <= twin_tol


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,factor,fp32_tol", [(torch.float32, None, 1e-5), (torch.bfloat16, 2.0, None),
                                                   (torch.float16, 2.0, None)])
@pytest.mark.parametrize("approximate", ["tanh", "none"])
@pytest.mark.parametrize("rows,d", SIZES)
@pytest.mark.parametrize("offset", [0, 1])
def test_gelu_kernel(dtype, factor, fp32_tol, approximate, rows, d, offset):
    n = rows * d
    x, dy = (_t(n + 1, dtype, "cuda", seed=d + i)[offset: offset + n].view(rows, d) for i in (0, 2))
    check_gelu(x, dy, approximate, dtype, factor, fp32_tol, 1e-6 if dtype == torch.float32 else 2 ** -7)


def check_gelu(x, dy, approximate, dtype, factor, fp32_tol, twin_tol):
    """The GELU kernel against float64 autograd and its twin, as check_swiglu."""
    y = gelu_forward(x, approximate, out=poison_(torch.empty_like(x)), backend="kernel")
    dx = gelu_backward(dy, x, approximate, out=poison_(torch.empty_like(x)), backend="kernel")
    x64 = x.double().requires_grad_()
    y64 = F.gelu(x64, approximate=approximate)
    (dx64,) = torch.autograd.grad(y64, x64, dy.double())
    xp = x.clone().requires_grad_()
    yp = F.gelu(xp, approximate=approximate)
    (dxp,) = torch.autograd.grad(yp, xp, dy)
    _check(dtype, factor, fp32_tol, y, y64, yp)
    _check(dtype, factor, fp32_tol, dx, dx64, dxp)
    assert rel_err(y, gelu_forward_reference(x, approximate)) <= twin_tol
    assert rel_err(dx, gelu_backward_reference(dy, x, approximate)) <= twin_tol


@pytest.mark.gpu
def test_kernel_non_contiguous_inputs_are_copied():
    gate = _t((64, 96), torch.float32, "cuda", seed=1).t()
    up = _t((64, 96), torch.float32, "cuda", seed=2).t()
    y = swiglu_forward(gate, up, backend="kernel")
    assert rel_err(y, swiglu_forward_reference(gate, up)) < 1e-6
