"""csrc SwiGLU / GELU kernels run by the CPU emulator, checked as tests/ops/test_activation.py checks them on a
GPU (same helpers and tolerances; fewer rows, since the emulator is slow)."""
import pytest
import torch

import gpu_tests
from gradmem_fast.ops.activation import swiglu_forward, swiglu_forward_reference
from helpers import rel_err

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
    T.check_swiglu(*_views(rows * d, rows, d, dtype, offset, (d, d + 1, d + 2)), dtype, factor, fp32_tol, twin_tol)


@pytest.mark.parametrize("dtype,factor,fp32_tol,twin_tol", DTYPES)
@pytest.mark.parametrize("approximate", ["tanh", "none"])
@pytest.mark.parametrize("rows,d", SIZES)
@pytest.mark.parametrize("offset", [0, 1])
def test_gelu_kernel(emulated, dtype, factor, fp32_tol, twin_tol, approximate, rows, d, offset):
    x, dy = _views(rows * d, rows, d, dtype, offset, (d, d + 2))
    T.check_gelu(x, dy, approximate, dtype, factor, fp32_tol, twin_tol)


def test_kernel_non_contiguous_inputs_are_copied(emulated):
    gate = T._t((64, 96), torch.float32, seed=1).t()
    up = T._t((64, 96), torch.float32, seed=2).t()
    y = swiglu_forward(gate, up, backend="kernel")
    assert rel_err(y, swiglu_forward_reference(gate, up)) < 1e-6
