"""csrc rotary kernels run by the CPU emulator, checked as tests/ops/test_rotary.py checks them on a GPU
(same helpers and tolerances; shorter sequences, since the emulator is slow)."""
import pytest
import torch

import gpu_tests
from gradmem_fast.ops.rotary import apply_rotary_, apply_rotary__reference, rotary_tables, rotary_tables_reference
from helpers import poison_, rel_err

T = gpu_tests.load("rotary")


@pytest.mark.parametrize("pos_dtype", [torch.int64, torch.int32, torch.float32])
@pytest.mark.parametrize("S,rotary_dim", [(4100, 128), (37, 20)])
def test_kernel_tables(emulated, pos_dtype, S, rotary_dim):
    inv = T._inv_freq(rotary_dim)
    pos = torch.arange(S).to(pos_dtype)
    half = rotary_dim // 2
    out = (poison_(torch.empty(S, half)), poison_(torch.empty(S, half)))
    cos, sin = rotary_tables(inv, pos, 0.7, out=out, backend="kernel")
    assert cos is out[0] and sin is out[1]
    angle = T._angle(pos, inv)
    assert rel_err(cos, angle.cos() * 0.7) < 1e-6 and rel_err(sin, angle.sin() * 0.7) < 1e-6
    rcos, rsin = rotary_tables_reference(inv, pos, 0.7)
    assert rel_err(cos, rcos) < 1e-6 and rel_err(sin, rsin) < 1e-6


def test_kernel_tables_grid_stride_loop(emulated):
    # more elements than 4096 blocks of 256 threads: each thread takes several
    inv, pos = T._inv_freq(128), torch.arange(16500)
    cos, sin = rotary_tables(inv, pos, 1.0, out=(poison_(torch.empty(16500, 64)), poison_(torch.empty(16500, 64))),
                             backend="kernel")
    angle = T._angle(pos, inv)
    assert rel_err(cos, angle.cos()) < 1e-6 and rel_err(sin, angle.sin()) < 1e-6


@pytest.mark.parametrize("dtype,factor,fp32_tol,twin_tol", [(torch.float32, None, 1e-5, None),
                                                            (torch.bfloat16, 2.0, None, 2 ** -8),
                                                            (torch.float16, 2.0, None, 2 ** -11)])
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("inverse", [False, True])
@pytest.mark.parametrize("B,S,H,D,rotary_dim", [(1, 1, 1, 32, 32), (2, 17, 12, 64, 64), (3, 7, 4, 80, 20),
                                                (2, 9, 8, 128, 128), (1, 13, 5, 48, 48), (2, 3, 3, 48, 44)])
def test_kernel_against_float64(emulated, dtype, factor, fp32_tol, twin_tol, interleaved, inverse, B, S, H, D,
                                rotary_dim):
    x = T._x((B, S, H, D), dtype, seed=S + D)
    inv = T._inv_freq(rotary_dim)
    pos = torch.arange(16, 16 + S)
    cos, sin = rotary_tables(inv, pos, 1.0, backend="kernel")
    y = apply_rotary_(x.clone(), cos, sin, rotary_dim=rotary_dim, interleaved=interleaved, inverse=inverse,
                      backend="kernel")
    ref64 = T._rotate64(x, T._angle(pos, inv), 1.0, rotary_dim, interleaved, inverse)
    twin = apply_rotary__reference(x.clone(), cos, sin, rotary_dim=rotary_dim, interleaved=interleaved,
                                   inverse=inverse)
    assert torch.equal(y[..., rotary_dim:], x[..., rotary_dim:])
    if dtype == torch.float32:
        assert rel_err(y, ref64) < fp32_tol and rel_err(y, twin) < fp32_tol
    elif not interleaved and not inverse and x.numel() >= 4096:  # enough elements for a stable max error
        plain = T._hf_rotate_half(x, cos.to(dtype), sin.to(dtype), rotary_dim)  # what the model computes
        assert rel_err(y, ref64) <= factor * rel_err(plain, ref64) + 1e-6
    else:
        assert rel_err(y, twin) <= twin_tol


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_strided_and_misaligned_views(emulated, dtype):
    buf = T._x((2, 5, 3 * 6 * 64 + 1), dtype, seed=6)
    for offset in (0, 1):  # offset 1: odd strides and pointer, the scalar path
        for interleaved in (False, True):
            k = buf[:, :, offset: offset + 3 * 6 * 64].view(2, 5, 3, 6, 64)[:, :, 1]
            before = buf.clone()
            cos, sin = rotary_tables(T._inv_freq(64), torch.arange(5), 1.0)
            expect = apply_rotary__reference(k.clone(), cos, sin, rotary_dim=64, interleaved=interleaved)
            apply_rotary_(k, cos, sin, rotary_dim=64, interleaved=interleaved, backend="kernel")
            assert rel_err(k, expect) < (1e-6 if dtype == torch.float32 else 2 ** -8)
            mask = torch.ones_like(buf, dtype=torch.bool)
            mask[:, :, offset: offset + 3 * 6 * 64].view(2, 5, 3, 6, 64)[:, :, 1] = False
            assert torch.equal(buf[mask], before[mask])
            buf.copy_(before)


@pytest.mark.parametrize("interleaved", [False, True])
def test_kernel_inverse_is_the_input_gradient(emulated, interleaved):
    x = T._x((2, 11, 3, 32), torch.float32, seed=3)
    dy = T._x((2, 11, 3, 32), torch.float32, seed=4)
    cos, sin = rotary_tables(T._inv_freq(24), torch.arange(11), 1.1, backend="kernel")
    xa = x.double().requires_grad_()
    y = apply_rotary__reference(xa.clone(), cos.double(), sin.double(), rotary_dim=24, interleaved=interleaved)
    (gx,) = torch.autograd.grad(y, xa, dy.double())
    dx = apply_rotary_(dy.clone(), cos, sin, rotary_dim=24, interleaved=interleaved, inverse=True, backend="kernel")
    assert rel_err(dx, gx) < 1e-6


def test_kernel_inverse_undoes_forward(emulated):
    x = T._x((2, 16, 4, 64), torch.float32, seed=8)
    cos, sin = rotary_tables(T._inv_freq(64), torch.arange(16), 1.0, backend="kernel")
    y = apply_rotary_(x.clone(), cos, sin, rotary_dim=64, backend="kernel")
    apply_rotary_(y, cos, sin, rotary_dim=64, inverse=True, backend="kernel")
    assert rel_err(y, x) < 1e-6


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2 ** -8), (torch.float16, 2 ** -11)])
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("inverse", [False, True])
@pytest.mark.parametrize("offset", [0, 1])  # 1: odd strides and pointer, the scalar path
@pytest.mark.parametrize("B,S,H,D,rotary_dim", [(1, 1, 1, 32, 32), (2, 9, 5, 64, 16), (3, 4, 2, 80, 20),
                                                (1, 3, 3, 128, 128)])
def test_kernel_per_head_qk_view(emulated, dtype, tol, interleaved, inverse, offset, B, S, H, D, rotary_dim):
    T._check_per_head_qk("kernel", "cpu", dtype, tol, B, S, H, D, rotary_dim, interleaved, inverse, offset=offset,
                         seed=S + D)
