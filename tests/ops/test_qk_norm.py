"""The grouped q/k RMS norm: the twin against autograd in float64, the Triton kernel (interpreter on CPU)
against the float64 twin on strided views of a fused projection, bad arguments."""
import pytest
import torch

from gradmem_fast.ops.qk_norm import (qk_norm_backward, qk_norm_backward_reference, qk_norm_forward,
                                      qk_norm_forward_reference)
from helpers import poison_, rel_err

EPS = 1e-6


def _inputs(B, S, G, D, dtype, seed=0, strided=True):
    """x, dy (B, S, G, D) as views of a wider (B, S, G * D + 5) buffer when strided, weight (G, D)."""
    g = torch.Generator().manual_seed(seed)
    width = G * D + (5 if strided else 0)
    x = (1.5 * torch.randn(B, S, width, generator=g, dtype=torch.float64))[..., :G * D].unflatten(-1, (G, D))
    dy = torch.randn(B, S, width, generator=g, dtype=torch.float64)[..., :G * D].unflatten(-1, (G, D))
    w = 1.0 + 0.3 * torch.randn(G, D, generator=g, dtype=torch.float64)
    return x.to(dtype), dy.to(dtype), w.to(dtype)


def test_twin_matches_autograd_float64():
    x, dy, w = _inputs(2, 5, 3, 16, torch.float64)
    xr = x.clone().requires_grad_(True)
    y_auto = xr * torch.rsqrt(xr.pow(2).mean(-1, keepdim=True) + EPS) * w
    y_auto.backward(dy)
    y, rstd = qk_norm_forward_reference(x, w, EPS)
    assert rel_err(y, y_auto.detach()) < 1e-13
    assert rel_err(qk_norm_backward_reference(dy, x, w, rstd), xr.grad) < 1e-12


@pytest.mark.parametrize("B, S, G, D", [(1, 1, 1, 16), (2, 7, 6, 16), (1, 37, 3, 24), (3, 5, 2, 64), (2, 4, 1, 96)])
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 2e-6), (torch.float16, 4e-3)])
def test_kernel_matches_twin(B, S, G, D, dtype, tol):
    pytest.importorskip("triton")
    x64, dy64, w64 = _inputs(B, S, G, D, torch.float64, seed=B * S + G)
    x, dy, w = x64.to(dtype), dy64.to(dtype), w64.to(dtype)
    y_ref, rstd_ref = qk_norm_forward_reference(x.double(), w.double(), EPS)
    dx_ref = qk_norm_backward_reference(dy.double(), x.double(), w.double(), rstd_ref)

    out_buf = poison_(torch.empty(B, S, G * D + 3, dtype=dtype))  # y written into a strided view
    out = out_buf[..., :G * D].unflatten(-1, (G, D))
    y, rstd = qk_norm_forward(x, w, EPS, out=out, backend="kernel")
    assert y is out and rstd.dtype == torch.float32 and rstd.shape == (B, S, G)
    assert rel_err(y, y_ref) < tol and rel_err(rstd, rstd_ref) < 1e-6
    assert torch.isnan(out_buf[..., G * D:]).all()  # nothing written outside the view
    dx = qk_norm_backward(dy, x, w, rstd, backend="kernel")
    assert dx.shape == x.shape and rel_err(dx, dx_ref) < tol


def test_plain_pytorch_error_bounds_the_fp16_kernel():
    x64, dy64, w64 = _inputs(2, 9, 4, 32, torch.float64, seed=3)
    x, dy, w = x64.half(), dy64.half(), w64.half()
    ref_y, ref_r = qk_norm_forward_reference(x.double(), w.double(), EPS)
    ref_dx = qk_norm_backward_reference(dy.double(), x.double(), w.double(), ref_r)
    plain = (x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + EPS).half() * w)
    y, rstd = qk_norm_forward(x, w, EPS, backend="kernel")
    assert rel_err(y, ref_y) <= 2 * rel_err(plain, ref_y) + 1e-3
    dx = qk_norm_backward(dy, x, w, rstd, backend="kernel")
    assert rel_err(dx, ref_dx) < 5e-3


def test_auto_takes_the_twin_for_float64_and_kernel_refuses():
    x, dy, w = _inputs(1, 3, 2, 16, torch.float64)
    with pytest.warns(UserWarning, match="float64"):
        y, rstd = qk_norm_forward(x, w, EPS, backend="auto")
    assert rel_err(y, qk_norm_forward_reference(x, w, EPS)[0]) == 0.0
    with pytest.raises(RuntimeError, match="float64"):
        qk_norm_forward(x, w, EPS, backend="kernel")


@pytest.mark.parametrize("bad, match", [
    (dict(weight=torch.ones(3, 16)), "weight"),
    (dict(eps=0.0), "eps"),
    (dict(out=torch.empty(2, 3, 2, 8)), "out"),
    (dict(backend="fastest"), "backend"),
])
def test_bad_arguments(bad, match):
    x, _, w = _inputs(2, 3, 2, 16, torch.float32)
    kw = dict(weight=w, eps=EPS)
    kw.update(bad)
    with pytest.raises(ValueError, match=match):
        qk_norm_forward(x, kw.pop("weight"), kw.pop("eps"), **kw)


def test_backward_bad_rstd():
    x, dy, w = _inputs(2, 3, 2, 16, torch.float32)
    with pytest.raises(ValueError, match="rstd"):
        qk_norm_backward(dy, x, w, torch.ones(2, 3))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("G, D", [(24, 128), (2, 2048), (1, 4096)])
def test_kernel_on_cuda(dtype, G, D):
    x64, dy64, w64 = _inputs(2, 33, G, D, torch.float64, seed=G)
    x, dy, w = (t.to("cuda", dtype) for t in (x64, dy64, w64))
    y_ref, r_ref = qk_norm_forward_reference(x.double(), w.double(), EPS)
    dx_ref = qk_norm_backward_reference(dy.double(), x.double(), w.double(), r_ref)
    y_plain, r_plain = qk_norm_forward_reference(x, w, EPS)  # the twin in the same dtype
    dx_plain = qk_norm_backward_reference(dy, x, w, r_plain)
    y, rstd = qk_norm_forward(x, w, EPS, backend="kernel")
    dx = qk_norm_backward(dy, x, w, rstd, backend="kernel")
    floor = 1e-6 if dtype == torch.float32 else 0.0
    assert rel_err(y, y_ref) <= 2 * rel_err(y_plain, y_ref) + floor
    assert rel_err(dx, dx_ref) <= 2 * rel_err(dx_plain, dx_ref) + floor
