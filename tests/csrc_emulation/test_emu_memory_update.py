"""csrc memory update kernel run by the CPU emulator, checked as tests/ops/test_memory_update.py checks it on a
GPU (same helpers, clips and tolerances; fewer samples, since the emulator is slow)."""
import pytest
import torch

import gpu_tests
from gradmem_fast.ops.memory_update import memory_update_, memory_update__reference
from helpers import rel_err

T = gpu_tests.load("memory_update")


@pytest.mark.parametrize("dtype,grad_dtype,tol", [(torch.float32, torch.float32, 1e-6),
                                                  (torch.bfloat16, torch.bfloat16, 2 ** -8),
                                                  (torch.bfloat16, torch.float32, 2 ** -8),
                                                  (torch.float16, torch.float16, 2 ** -10),
                                                  (torch.float16, torch.float32, 2 ** -10)])
@pytest.mark.parametrize("clip_value,clip_norm", T.CLIPS)
@pytest.mark.parametrize("shape", [(1, 1, 48), (3, 16, 2050), (5, 8, 128), (2, 16, 2048), (2, 1, 20)])
def test_kernel(emulated, dtype, grad_dtype, tol, clip_value, clip_norm, shape):
    memory = T._t(shape, dtype, seed=7)
    grad = T._t(shape, grad_dtype, seed=8, scale=0.3)
    lr = torch.tensor([0.5])
    grad_before = grad.clone()
    expect = T._update64(memory, grad, 0.5, clip_value, clip_norm)
    twin = memory_update__reference(memory.clone(), grad, lr, clip_value=clip_value, clip_norm=clip_norm)
    out = memory_update_(memory, grad, lr, clip_value=clip_value, clip_norm=clip_norm, backend="kernel")
    assert out is memory and torch.equal(grad, grad_before)
    # one rounding of the float32 result to the memory dtype: within half an ulp of the largest value
    assert rel_err(memory, expect) <= tol
    assert rel_err(memory, twin) <= tol


def test_kernel_norm_clip_bounds_each_sample_step(emulated):
    memory, grad = T._t((4, 8, 64), torch.float32, seed=3), T._t((4, 8, 64), torch.float32, seed=4, scale=5.0)
    grad[1] *= 1e-3  # a sample below the clip keeps its gradient
    before = memory.clone()
    memory_update_(memory, grad, torch.tensor([1.0]), clip_norm=2.0, backend="kernel")
    step = (before - memory).double().reshape(4, -1).norm(dim=1)
    assert (step[[0, 2, 3]] - 2.0).abs().max() < 1e-5
    assert rel_err(step[1], grad[1].double().norm()) < 1e-5


def test_kernel_reads_lr_from_the_tensor(emulated):
    memory = T._t((4, 8, 256), torch.float32, seed=9)
    grad = T._t((4, 8, 256), torch.float32, seed=10)
    start = memory.clone()
    lr = torch.tensor(0.0)
    memory_update_(memory, grad, lr, clip_norm=1.0, backend="kernel", validate=False)
    assert torch.equal(memory, start)
    lr.fill_(0.25)
    memory_update_(memory, grad, lr, clip_norm=1.0, backend="kernel", validate=False)
    assert rel_err(memory, T._update64(start, grad, 0.25, None, 1.0)) < 1e-6
