import pytest
import torch

from gradmem_fast.ops.rotary import apply_rotary_, apply_rotary__reference, rotary_tables, rotary_tables_reference
from helpers import rel_err


def _inv_freq(rotary_dim, base=10000.0):
    return 1.0 / (base ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32) / rotary_dim))


def _angle(positions, inv_freq):
    """The float32 product is part of the definition (as in Hugging Face models), exact in float64."""
    return (positions.float()[:, None] * inv_freq.float()[None, :]).double()


def _rotate64(x, angle, scaling, rotary_dim, interleaved, inverse):
    """Independent float64 definition: each pair (a, b) as a + ib, multiplied by scaling * exp(+-i angle)."""
    x = x.double().clone()
    rot = torch.polar(torch.full_like(angle, scaling), -angle if inverse else angle)[None, :, None, :]
    if interleaved:
        a, b = x[..., 0:rotary_dim:2], x[..., 1:rotary_dim:2]
    else:
        a, b = x[..., : rotary_dim // 2], x[..., rotary_dim // 2: rotary_dim]
    z = torch.complex(a.contiguous(), b.contiguous()) * rot
    a.copy_(z.real)
    b.copy_(z.imag)
    return x


def _hf_rotate_half(x, cos, sin, rotary_dim):
    """Hugging Face's formula on the rotary part: x * cat(cos, cos) + rotate_half(x) * cat(sin, sin)."""
    xr, xp = x[..., :rotary_dim], x[..., rotary_dim:]
    c = torch.cat([cos, cos], -1)[None, :, None, :]
    s = torch.cat([sin, sin], -1)[None, :, None, :]
    x1, x2 = xr[..., : rotary_dim // 2], xr[..., rotary_dim // 2:]
    return torch.cat([xr * c + torch.cat([-x2, x1], -1) * s, xp], -1)


def _x(shape, dtype, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(device, dtype)


def _check_per_head_qk(backend, device, dtype, tol, B, S, H, D, rotary_dim, interleaved, inverse, offset=0, seed=0):
    """Rotates the (B, S, H, 2, D) q and k view of a per-head fused projection [q_h | k_h | v_h] (H, 3, D) in
    one call; q and k must match the float64 rotation of each head (fp32) or the twin (16-bit, `tol`), and
    v, the features past rotary_dim and the `offset` leading elements must stay bit for bit."""
    width = H * 3 * D
    buf = _x((B, S, width + offset), dtype, device=device, seed=seed)
    before = buf.clone()
    qk = buf[..., offset:].view(B, S, H, 3, D)[..., :2, :]
    inv = _inv_freq(rotary_dim).to(device)
    pos = torch.arange(5, 5 + S, device=device)
    cos, sin = rotary_tables(inv, pos, 0.8)
    out = apply_rotary_(qk, cos, sin, rotary_dim=rotary_dim, interleaved=interleaved, inverse=inverse,
                        backend=backend)
    assert out is qk
    qk0 = before[..., offset:].view(B, S, H, 3, D)[..., :2, :]
    ref64 = _rotate64(qk0.flatten(2, 3).cpu(), _angle(pos.cpu(), inv.cpu()), 0.8, rotary_dim, interleaved,
                      inverse).view(B, S, H, 2, D)
    twin = apply_rotary__reference(qk0.clone(), cos, sin, rotary_dim=rotary_dim, interleaved=interleaved,
                                   inverse=inverse)
    if dtype == torch.float32:
        assert rel_err(qk.cpu(), ref64) < tol and rel_err(qk, twin) < tol
    else:
        assert rel_err(qk, twin) <= tol
    assert torch.equal(qk[..., rotary_dim:], qk0[..., rotary_dim:])
    untouched = torch.ones_like(buf, dtype=torch.bool)
    untouched[..., offset:].view(B, S, H, 3, D)[..., :2, :rotary_dim] = False
    assert torch.equal(buf[untouched], before[untouched])


# ---------------------------------------------------------------- twins on CPU


def test_tables_reference_match_float64():
    inv = _inv_freq(64)
    pos = torch.arange(3000)
    cos, sin = rotary_tables_reference(inv, pos, 1.25)
    angle = _angle(pos, inv)
    assert cos.dtype == torch.float32 and cos.shape == (3000, 32)
    assert rel_err(cos, angle.cos() * 1.25) < 1e-6 and rel_err(sin, angle.sin() * 1.25) < 1e-6


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("inverse", [False, True])
@pytest.mark.parametrize("shape,rotary_dim", [((1, 1, 1, 32), 32), ((2, 37, 3, 64), 64), ((2, 5, 4, 24), 12)])
def test_reference_matches_float64_rotation(interleaved, inverse, shape, rotary_dim):
    x = _x(shape, torch.float64, seed=1)
    pos = torch.arange(7, 7 + shape[1])
    inv = _inv_freq(rotary_dim)
    cos, sin = rotary_tables_reference(inv, pos, 0.9)
    y = apply_rotary__reference(x.clone(), cos.double(), sin.double(), rotary_dim=rotary_dim,
                                interleaved=interleaved, inverse=inverse)
    ref = _rotate64(x, _angle(pos, inv), 0.9, rotary_dim, interleaved, inverse)
    assert rel_err(y, ref) < 1e-6  # the float32 tables carry float32 rounding
    assert torch.equal(y[..., rotary_dim:], x[..., rotary_dim:])


def test_reference_matches_hugging_face_half_split():
    x = _x((2, 9, 3, 16), torch.float64, seed=2)
    cos, sin = rotary_tables_reference(_inv_freq(8), torch.arange(9), 1.0)
    y = apply_rotary__reference(x.clone(), cos.double(), sin.double(), rotary_dim=8)
    assert rel_err(y, _hf_rotate_half(x, cos.double(), sin.double(), 8)) < 1e-15


@pytest.mark.parametrize("interleaved", [False, True])
def test_inverse_is_the_input_gradient(interleaved):
    x = _x((2, 11, 3, 32), torch.float64, seed=3).requires_grad_()
    dy = _x((2, 11, 3, 32), torch.float64, seed=4)
    cos, sin = rotary_tables_reference(_inv_freq(24), torch.arange(11), 1.1)
    y = apply_rotary__reference(x.clone(), cos.double(), sin.double(), rotary_dim=24, interleaved=interleaved)
    (gx,) = torch.autograd.grad(y, x, dy)
    dx = apply_rotary__reference(dy.clone(), cos.double(), sin.double(), rotary_dim=24, interleaved=interleaved,
                                 inverse=True)
    assert rel_err(dx, gx) < 1e-14


def test_public_cpu_strided_in_place():
    buf = _x((2, 6, 3 * 4 * 16), torch.float32, seed=5)
    q = buf.view(2, 6, 3, 4, 16)[:, :, 1]  # (B, S, H, D) view of a fused qkv buffer
    before = buf.clone()
    cos, sin = rotary_tables(_inv_freq(16), torch.arange(6), 1.0)
    out = apply_rotary_(q, cos, sin, rotary_dim=16)
    assert out is q
    ref = apply_rotary__reference(before.view(2, 6, 3, 4, 16)[:, :, 1].clone(), cos, sin, rotary_dim=16)
    assert torch.equal(q, ref)
    untouched = before.view(2, 6, 3, 4, 16)[:, :, [0, 2]]
    assert torch.equal(buf.view(2, 6, 3, 4, 16)[:, :, [0, 2]], untouched)


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("inverse", [False, True])
@pytest.mark.parametrize("B,S,H,D,rotary_dim", [(1, 1, 1, 8, 8), (2, 37, 3, 16, 8), (3, 5, 4, 24, 24)])
def test_reference_per_head_qk_view_matches_float64(interleaved, inverse, B, S, H, D, rotary_dim):
    _check_per_head_qk("reference", "cpu", torch.float32, 1e-6, B, S, H, D, rotary_dim, interleaved, inverse,
                       seed=S)


def test_reference_five_d_inverse_is_the_input_gradient():
    x = _x((2, 7, 3, 2, 16), torch.float64, seed=9).requires_grad_()
    dy = _x((2, 7, 3, 2, 16), torch.float64, seed=10)
    cos, sin = rotary_tables_reference(_inv_freq(12), torch.arange(7), 1.1)
    y = apply_rotary__reference(x.clone(), cos.double(), sin.double(), rotary_dim=12)
    (gx,) = torch.autograd.grad(y, x, dy)
    dx = apply_rotary__reference(dy.clone(), cos.double(), sin.double(), rotary_dim=12, inverse=True)
    assert rel_err(dx, gx) < 1e-14


def test_bad_inputs_raise_value_error():
    x = _x((1, 4, 2, 8), torch.float32)
    cos, sin = rotary_tables(_inv_freq(8), torch.arange(4), 1.0)
    with pytest.raises(ValueError, match="rotary_dim"):
        apply_rotary_(x, cos, sin, rotary_dim=7)
    with pytest.raises(ValueError, match="rotary_dim"):
        apply_rotary_(x, cos, sin, rotary_dim=10)
    with pytest.raises(ValueError, match="cos"):
        apply_rotary_(x, cos[:3], sin, rotary_dim=8)
    with pytest.raises(ValueError, match="B, S, H, D"):
        apply_rotary_(x[0], cos, sin, rotary_dim=8)
    with pytest.raises(ValueError, match="B, S, H, G, D"):
        apply_rotary_(x[..., None, None, :], cos, sin, rotary_dim=8)
    with pytest.raises(ValueError, match="contiguous"):
        apply_rotary_(x.transpose(2, 3)[:, :, :, None], cos, sin, rotary_dim=2)
    with pytest.raises(ValueError, match="rotary_dim"):
        apply_rotary_(x[:, :, :, None], cos, sin, rotary_dim=10)
    with pytest.raises(ValueError, match="contiguous"):
        apply_rotary_(x.transpose(2, 3), cos, sin, rotary_dim=2)
    with pytest.raises(ValueError, match="positions"):
        rotary_tables(_inv_freq(8), torch.zeros(2, 3), 1.0)
    with pytest.raises(RuntimeError, match="cpu"):
        apply_rotary_(x, cos, sin, rotary_dim=8, backend="kernel")


# ---------------------------------------------------------------- csrc kernels, GPU only


@pytest.mark.gpu
@pytest.mark.parametrize("pos_dtype", [torch.int64, torch.int32, torch.float32])
def test_kernel_tables(pos_dtype):
    inv = _inv_freq(128).cuda()
    pos = torch.arange(4100, device="cuda").to(pos_dtype)
    out = (torch.full((4100, 64), float("nan"), device="cuda"), torch.full((4100, 64), float("nan"), device="cuda"))
    cos, sin = rotary_tables(inv, pos, 0.7, out=out, backend="kernel")
    angle = _angle(pos.cpu(), inv.cpu())
    assert rel_err(cos.cpu(), angle.cos() * 0.7) < 1e-6 and rel_err(sin.cpu(), angle.sin() * 0.7) < 1e-6


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,factor,fp32_tol", [(torch.float32, None, 1e-5), (torch.bfloat16, 2.0, None)])
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("inverse", [False, True])
@pytest.mark.parametrize("B,S,H,D,rotary_dim", [(1, 1, 1, 32, 32), (2, 257, 12, 64, 64), (3, 37, 4, 80, 20),
                                                (2, 100, 8, 128, 128), (1, 13, 5, 48, 48)])
def test_kernel_against_float64(dtype, factor, fp32_tol, interleaved, inverse, B, S, H, D, rotary_dim):
    x = _x((B, S, H, D), dtype, device="cuda", seed=S + D)
    inv = _inv_freq(rotary_dim).cuda()
    pos = torch.arange(16, 16 + S, device="cuda")
    cos, sin = rotary_tables(inv, pos, 1.0, backend="kernel")
    y = apply_rotary_(x.clone(), cos, sin, rotary_dim=rotary_dim, interleaved=interleaved, inverse=inverse,
                      backend="kernel")
    ref64 = _rotate64(x.cpu(), _angle(pos.cpu(), inv.cpu()), 1.0, rotary_dim, interleaved, inverse)
    twin = apply_rotary__reference(x.clone(), cos, sin, rotary_dim=rotary_dim, interleaved=interleaved,
                                   inverse=inverse)
    assert torch.equal(y[..., rotary_dim:], x[..., rotary_dim:])
    if dtype == torch.float32:
        assert rel_err(y.cpu(), ref64) < fp32_tol and rel_err(y, twin) < fp32_tol
    elif not interleaved and not inverse and x.numel() >= 4096:  # enough elements for a stable max error
        plain = _hf_rotate_half(x, cos.to(dtype), sin.to(dtype), rotary_dim)  # what the model computes
        assert rel_err(y.cpu(), ref64) <= factor * rel_err(plain.cpu(), ref64) + 1e-6
    else:
        assert rel_err(y, twin) <= 2 ** -8


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_strided_and_misaligned_views(dtype):
    buf = _x((2, 50, 3 * 6 * 64 + 1), dtype, device="cuda", seed=6)
    for offset in (0, 1):  # offset 1: odd strides and pointer, the scalar path
        k = buf[:, :, offset: offset + 3 * 6 * 64].view(2, 50, 3, 6, 64)[:, :, 1]
        before = buf.clone()
        cos, sin = rotary_tables(_inv_freq(64).cuda(), torch.arange(50, device="cuda"), 1.0)
        expect = apply_rotary__reference(k.clone(), cos, sin, rotary_dim=64)
        apply_rotary_(k, cos, sin, rotary_dim=64, backend="kernel")
        assert rel_err(k, expect) < (1e-6 if dtype == torch.float32 else 2 ** -8)
        mask = torch.ones_like(buf, dtype=torch.bool)
        mask[:, :, offset: offset + 3 * 6 * 64].view(2, 50, 3, 6, 64)[:, :, 1] = False
        assert torch.equal(buf[mask], before[mask])
        buf.copy_(before)


@pytest.mark.gpu
def test_kernel_inverse_undoes_forward():
    x = _x((2, 64, 4, 64), torch.float32, device="cuda", seed=8)
    cos, sin = rotary_tables(_inv_freq(64).cuda(), torch.arange(64, device="cuda"), 1.0)
    y = apply_rotary_(x.clone(), cos, sin, rotary_dim=64, backend="kernel")
    apply_rotary_(y, cos, sin, rotary_dim=64, inverse=True, backend="kernel")
    assert rel_err(y, x) < 1e-6


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2 ** -8), (torch.float16, 2 ** -11)])
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("inverse", [False, True])
@pytest.mark.parametrize("offset", [0, 1])  # 1: odd strides and pointer, the scalar path
@pytest.mark.parametrize("B,S,H,D,rotary_dim", [(1, 1, 1, 32, 32), (2, 257, 12, 64, 16), (3, 37, 4, 80, 20),
                                                (1, 100, 8, 128, 128)])
def test_kernel_per_head_qk_view(dtype, tol, interleaved, inverse, offset, B, S, H, D, rotary_dim):
    _check_per_head_qk("kernel", "cuda", dtype, tol, B, S, H, D, rotary_dim, interleaved, inverse, offset=offset,
                       seed=S + D)
