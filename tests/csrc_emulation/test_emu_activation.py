"""csrc SwiGLU / GELU kernels run by the CPU emulator, checked as tests/ops/test_activation.py checks them on a
GPU (same helpers and tolerances; fewer rows, since the emulator is slow)."""
import pytest
import torch
import torch.nn.functional as F

import gpu_tests
from gradmem_fast.ops.activation import (gelu_backward, gelu_backward_reference, gelu_forward,
                                         gelu_forward_reference, swiglu_backward, swiglu_backward_reference,
                                         swiglu_forward, swiglu_forward_reference)
from helpers import poison_, rel_err

T = gpu_tests.load("activation")
# the GPU tests' widths with fewer rows; 3 * 2050 and 37 * 80 leave a tail after the 16-byte vectors
SIZES = [(1, 48), (37, 80), (3, 768), (3, 2050), (1, 8192), (1, 3)]
assert {d for _, d in SIZES} >= {d for _, d in T.SIZES}
DTYPES = [(torch.float32, None, 1e-5, 1e-6), (torch.bfloat16, 2.0, None, 2 ** -7), (torch.float16, 2.0, None, 2 ** -10)]


def _views(n, rows, d, dtype, offset, seeds):
    """Views of length n at element offset `offset` (1: not 16-byte aligned, the scalar path)."""
    return [T._t(n + 1, dtype, seed=s)[offset: offset + n].view(rows, d) for s in seeds]


@pytest.mark.parametrize("dtype,factor,fp32_tol,twin_tol", DTYPES)
@pytest.mark.parametrize("rows,d", SIZES)
@pytest.mark.parametrize("offset", [0, 1])
def test_swiglu_kernel(emulated, dtype, factor, fp32_tol, twin_tol, rows, d, offset):
    gate, up, dy = _views(rows * d, rows, d, dtype, offset, (d, d + 1, d + 2))
    y = swiglu_forward(gate, up, out=poison_(torch.empty_like(gate)), backend="kernel")
    d_gate, d_up = swiglu_backward(dy, gate, up, out=(poison_(torch.empty_like(gate)), poison_(torch.empty_like(gate))),
                                   backend="kernel")
    g64, u64, dy64 = gate.double().requires_grad_(), up.double().requires_grad_(), dy.double()
    y64 = F.silu(g64) * u64
    dg64, du64 = torch.autograd.grad(y64, (g64, u64), dy64)
    gp, upp = gate.clone().requires_grad_(), up.clone().requires_grad_()
    yp = F.silu(gp) * upp  # the plain PyTorch computation in the same dtype
    dgp, dup = torch.autograd.grad(yp, (gp, upp), dy)
    T._check(dtype, factor, fp32_tol, y, y64, yp)
    T._check(dtype, factor, fp32_tol, d_gate, dg64, dgp)
    T._check(dtype, factor, fp32_tol, d_up, du64, dup)
    rg, ru = swiglu_backward_reference(dy, gate, up)
    assert rel_err(y, swiglu_forward_reference(gate, up)) <= twin_tol
    assert rel_err(d_gate, rg) <= twin_tol and rel_err(d_up, ru) <= twin_tol


@pytest.mark.parametrize("dtype,factor,fp32_tol,twin_tol", DTYPES)
@pytest.mark.parametrize("approximate", ["tanh", "none"])
@pytest.mark.parametrize("rows,d", SIZES)
@pytest.mark.parametrize("offset", [0, 1])
def test_gelu_kernel(emulated, dtype, factor, fp32_tol, twin_tol, approximate, rows, d, offset):
    x, dy = _views(rows * d, rows, d, dtype, offset, (d, d + 2))
    y = gelu_forward(x, approximate, out=poison_(torch.empty_like(x)), backend="kernel")
    dx = gelu_backward(dy, x, approximate, out=poison_(torch.empty_like(x)), backend="kernel")
    x64 = x.double().requires_grad_()
    y64 = F.gelu(x64, approximate=approximate)
    (dx64,) = torch.autograd.grad(y64, x64, dy.double())
    xp = x.clone().requires_grad_()
    yp = F.gelu(xp, approximate=approximate)
    (dxp,) = torch.autograd.grad(yp, xp, dy)
    T._check(dtype, factor, fp32_tol, y, y64, yp)
    T._check(dtype, factor, fp32_tol, dx, dx64, dxp)
    assert rel_err(y, gelu_forward_reference(x, approximate)) <= twin_tol
    assert rel_err(dx, gelu_backward_reference(dy, x, approximate)) <= twin_tol


def test_kernel_non_contiguous_inputs_are_copied(emulated):
    gate = T._t((64, 96), torch.float32, seed=1).t()
    up = T._t((64, 96), torch.float32, seed=2).t()
    y = swiglu_forward(gate, up, backend="kernel")
    assert rel_err(y, swiglu_forward_reference(gate, up)) < 1e-6
