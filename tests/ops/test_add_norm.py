import pytest
import torch
import torch.nn.functional as F

from gradmem_fast.ops.add_norm import (add_norm_backward, add_norm_backward_reference, add_norm_forward,
                                       add_norm_forward_reference)
from helpers import poison_, rel_err

KINDS = ("rms", "layer")


def _inputs(shape, dtype, device="cpu", seed=0, bias=True, residual=True):
    g = torch.Generator().manual_seed(seed)
    d = shape[-1]
    mk = lambda *s, scale=1.0: (scale * torch.randn(*s, generator=g, dtype=torch.float64) + 0.3).to(device, dtype)
    x = mk(*shape)
    res = mk(*shape, scale=2.0) if residual else None
    w = mk(d, scale=0.5)
    b = mk(d, scale=0.2) if bias else None
    return x, res, w, b


def _norm64(h, w, b, eps, kind):
    """Independent float64 definition: torch's own layer_norm / rms_norm."""
    d = h.shape[-1]
    if kind == "layer":
        return F.layer_norm(h, (d,), w, b, eps)
    y = F.rms_norm(h, (d,), w, eps)
    return y if b is None else y + b


# ---------------------------------------------------------------- twins on CPU, float64


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", [(1, 48), (3, 7, 80), (37, 257)])
@pytest.mark.parametrize("with_res,with_bias", [(True, True), (False, False), (True, False)])
def test_forward_reference_matches_torch_norm(kind, shape, with_res, with_bias):
    x, res, w, b = _inputs(shape, torch.float64, seed=1, bias=with_bias, residual=with_res)
    y, res_out, stats = add_norm_forward_reference(x, res, w, b, 1e-5, kind)
    h = x if res is None else x + res
    assert rel_err(res_out, h) == 0.0
    if res is None:
        assert res_out is x
    assert rel_err(y, _norm64(h, w, b, 1e-5, kind)) < 1e-12
    rows = h.reshape(-1, shape[-1])
    mean = rows.mean(-1) if kind == "layer" else torch.zeros(rows.shape[0], dtype=torch.float64)
    rstd = 1.0 / ((rows - mean[:, None]).square().mean(-1) + 1e-5).sqrt()
    assert stats.shape == (rows.shape[0], 2)
    assert rel_err(stats[:, 0], mean) < 1e-12 and rel_err(stats[:, 1], rstd) < 1e-12


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", [(1, 48), (2, 5, 80), (37, 100)])
@pytest.mark.parametrize("with_dres", [True, False])
def test_backward_reference_matches_autograd(kind, shape, with_dres):
    x, res, w, b = _inputs(shape, torch.float64, seed=2)
    g = torch.Generator().manual_seed(3)
    dy = torch.randn(shape, generator=g, dtype=torch.float64)
    dres = torch.randn(shape, generator=g, dtype=torch.float64) if with_dres else None
    xa, ra = x.clone().requires_grad_(), res.clone().requires_grad_()
    y, res_out, _ = add_norm_forward_reference(xa, ra, w, b, 1e-5, kind)
    loss = (y * dy).sum() + ((res_out * dres).sum() if with_dres else 0.0)
    gx, gr = torch.autograd.grad(loss, (xa, ra))
    _, res_out, stats = add_norm_forward_reference(x, res, w, b, 1e-5, kind)
    dx = add_norm_backward_reference(dy, dres, res_out, w, stats, kind)
    assert rel_err(dx, gx) < 1e-12 and rel_err(dx, gr) < 1e-12


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6)])
@pytest.mark.parametrize("kind", KINDS)
def test_reference_fp32_close_to_float64(dtype, tol, kind):
    x, res, w, b = _inputs((33, 96), dtype, seed=4)
    y, res_out, stats = add_norm_forward_reference(x, res, w, b, 1e-5, kind)
    y64, _, _ = add_norm_forward_reference(*(t.double() for t in (x, res, w, b)), 1e-5, kind)
    assert stats.dtype == torch.float32
    assert rel_err(y, y64) < tol


# ---------------------------------------------------------------- public function on CPU


@pytest.mark.parametrize("kind", KINDS)
def test_public_cpu_uses_reference_and_fills_out(kind):
    x, res, w, b = _inputs((5, 3, 48), torch.float32, seed=5)
    out = (poison_(torch.empty_like(x)), poison_(torch.empty_like(x)), poison_(torch.empty(15, 2)))
    y, res_out, stats = add_norm_forward(x, res, w, b, 1e-6, kind, out=out)
    assert y is out[0] and res_out is out[1] and stats is out[2]
    ry, rres, rstats = add_norm_forward_reference(x, res, w, b, 1e-6, kind)
    assert torch.equal(y, ry) and torch.equal(res_out, rres) and torch.equal(stats, rstats)
    dy = torch.randn_like(x)
    dx = add_norm_backward(dy, None, res_out, w, stats, kind, out=poison_(torch.empty_like(x)))
    assert torch.equal(dx, add_norm_backward_reference(dy, None, res_out, w, stats, kind))


def test_public_kernel_backend_on_cpu_raises():
    x, res, w, b = _inputs((4, 48), torch.float32)
    with pytest.raises(RuntimeError, match="cpu"):
        add_norm_forward(x, res, w, b, 1e-5, "rms", backend="kernel")
    with pytest.raises(ValueError, match="backend"):
        add_norm_forward(x, res, w, b, 1e-5, "rms", backend="fast")


def test_bad_inputs_raise_value_error():
    x, res, w, b = _inputs((4, 48), torch.float32)
    stats = torch.zeros(4, 2)
    with pytest.raises(ValueError, match="kind"):
        add_norm_forward(x, res, w, b, 1e-5, "batch")
    with pytest.raises(ValueError, match="weight"):
        add_norm_forward(x, res, w[:-1], b, 1e-5, "rms")
    with pytest.raises(ValueError, match="residual"):
        add_norm_forward(x, res[:, :-1], w, b, 1e-5, "rms")
    with pytest.raises(ValueError, match="residual"):
        add_norm_forward(x, res.double(), w, b, 1e-5, "rms")
    with pytest.raises(ValueError, match="bias"):
        add_norm_forward(x, res, w, b[:3], 1e-5, "layer")
    with pytest.raises(ValueError, match="eps"):
        add_norm_forward(x, res, w, b, 0.0, "layer")
    with pytest.raises(ValueError, match="stats"):
        add_norm_forward(x, res, w, b, 1e-5, "layer", out=(torch.empty_like(x), torch.empty_like(x),
                                                          torch.empty(3, 2)))
    with pytest.raises(ValueError, match="stats"):
        add_norm_backward(x, None, x, w, stats[:3], "rms")
    with pytest.raises(ValueError, match="dy"):
        add_norm_backward(x[:2], None, x, w, stats, "rms")
    with pytest.raises(ValueError, match="d_residual_out"):
        add_norm_backward(x, x.half(), x, w, stats, "rms")
    with pytest.raises(ValueError, match="d_residual_out"):
        add_norm_backward(x, torch.empty(8, 48)[::2, :-1], x, w, stats, "rms")


# ---------------------------------------------------------------- csrc kernels, GPU only

WIDTHS = (48, 80, 768, 2048, 2050)


def _plain_torch(x, res, w, b, eps, kind, dy, dres):
    """What a plain PyTorch model computes in x's dtype: forward y and the residual-stream gradient."""
    xa = x.clone().requires_grad_()
    h = xa + res if res is not None else xa
    y = _norm64(h, w, b, eps, kind)
    (g,) = torch.autograd.grad(y, xa, dy)
    if dres is not None:
        g = g + dres
    return y.detach(), g


def _strided_d_residual_out(layout, B, m, d, dtype, device, seed, offset):
    """(d_residual_out view, its whole buffer) of B * m rows of width d with strided rows:
    "samples": the first m of S = m + 3 rows of each sample of a (B, S, d) buffer (the layer-0 memory rows);
    "rows": a (B * m, d) view of rows 2d + 1 apart; "blocks": a (B, m // 2, 2, d) view of every other pair of
    rows of each sample with a gap between samples, which no 2-D or 3-D row view covers (the wrapper copies
    it). offset: elements before the first row."""
    g = torch.Generator().manual_seed(seed)
    n = {"samples": B * (m + 3) * d, "rows": B * m * (2 * d + 1), "blocks": B * (m // 2 + 1) * 4 * d}[layout]
    buf = torch.randn(n + offset, generator=g, dtype=torch.float64).to(device, dtype)
    flat = buf[offset:]
    if layout == "samples":
        view = flat.view(B, m + 3, d)[:, :m]
    elif layout == "rows":
        view = flat.view(B * m, 2 * d + 1)[:, :d]
    else:
        view = flat.view(B, m // 2 + 1, 2, 2, d)[:, :m // 2, 0]
    return view, buf


def _check_strided_d_residual_out(backend, device, dtype, factor, fp32_tol, kind, layout, B, m, d, offset):
    """The backward with a strided d_residual_out against float64 autograd and the twin; the gradient buffer
    must stay unchanged and every element of the poisoned output written."""
    shape = (B, m // 2, 2, d) if layout == "blocks" else ((B, m, d) if layout == "samples" else (B * m, d))
    x, res, w, b = _inputs(shape, dtype, device=device, seed=d + m, bias=True, residual=True)
    dy = torch.randn(shape, generator=torch.Generator().manual_seed(5)).to(device, dtype)
    dres, buf = _strided_d_residual_out(layout, B, m, d, dtype, device, seed=d, offset=offset)
    assert dres.shape == shape and dres.is_contiguous() == (layout == "samples" and B == 1)
    before = buf.clone()
    y, res_out, stats = add_norm_forward(x, res, w, b, 1e-5, kind, backend=backend)
    dx = add_norm_backward(dy, dres, res_out, w, stats, kind, out=poison_(torch.empty_like(x)), backend=backend)
    assert torch.equal(buf, before)
    up = lambda t: t.double()
    _, dx64 = _plain_torch(up(res_out), None, up(w), up(b), 1e-5, kind, up(dy), up(dres))
    twin = add_norm_backward_reference(dy, dres.contiguous(), res_out, w, stats, kind)
    if dtype == torch.float32:
        assert rel_err(dx, dx64) < fp32_tol and rel_err(dx, twin) < fp32_tol
    else:
        _, pdx = _plain_torch(res_out, None, w, b, 1e-5, kind, dy, dres)
        assert rel_err(dx, dx64) <= factor * rel_err(pdx, dx64) + 1e-6


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("layout", ["samples", "rows", "blocks"])
def test_reference_strided_d_residual_out(kind, layout):
    _check_strided_d_residual_out("reference", "cpu", torch.float32, None, 1e-5, kind, layout, 3, 4, 48, 0)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,factor,fp32_tol", [(torch.float32, None, 1e-5), (torch.bfloat16, 2.0, None),
                                                   (torch.float16, 2.0, None)])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("layout", ["samples", "rows", "blocks"])
@pytest.mark.parametrize("B,m,d", [(1, 4, 48), (4, 16, 768), (3, 8, 2050), (2, 32, 2048)])
@pytest.mark.parametrize("offset", [0, 1])  # 1: misaligned rows, the scalar path
def test_kernel_strided_d_residual_out(dtype, factor, fp32_tol, kind, layout, B, m, d, offset):
    _check_strided_d_residual_out("kernel", "cuda", dtype, factor, fp32_tol, kind, layout, B, m, d, offset)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,factor,fp32_tol", [(torch.float32, None, 1e-5), (torch.bfloat16, 2.0, None),
                                                   (torch.float16, 2.0, None)])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("d", WIDTHS)
@pytest.mark.parametrize("rows", [1, 1037])
@pytest.mark.parametrize("with_res,with_bias", [(True, True), (False, False)])
def test_kernel_against_float64(dtype, factor, fp32_tol, kind, d, rows, with_res, with_bias):
    x, res, w, b = _inputs((rows, d), dtype, device="cuda", seed=d + rows, bias=with_bias, residual=with_res)
    g = torch.Generator().manual_seed(7)
    dy = torch.randn(rows, d, generator=g).to("cuda", dtype)
    dres = torch.randn(rows, d, generator=g).to("cuda", dtype)
    check_kernel(x, res, w, b, dy, dres, kind, dtype, factor, fp32_tol)


def check_kernel(x, res, w, b, dy, dres, kind, dtype, factor, fp32_tol):
    """add_norm forward and backward kernels against float64 (16-bit: within `factor` of the plain PyTorch
    error) and the twins, into NaN-poisoned out= buffers. Shared with the emulated tests (tests/csrc_emulation)."""
    out = (poison_(torch.empty_like(x)), poison_(torch.empty_like(x)),
           poison_(torch.empty(x.shape[0], 2, device=x.device)))
    y, res_out, stats = add_norm_forward(x, res, w, b, 1e-5, kind, out=out, backend="kernel")
    assert y is out[0] and stats is out[2] and res_out is (x if res is None else out[1])
    dx = add_norm_backward(dy, dres, res_out, w, stats, kind, out=poison_(torch.empty_like(x)), backend="kernel")

    # residual_out is the dtype's own rounded sum, bit for bit
    h = x if res is None else x + res
    assert torch.equal(res_out, h)
    up = lambda t: None if t is None else t.double()
    y64, dx64 = _plain_torch(up(h), None, up(w), up(b), 1e-5, kind, up(dy), up(dres))
    _, _, stats64 = add_norm_forward_reference(up(h), None, up(w), up(b), 1e-5, kind)
    assert rel_err(stats, stats64) < 1e-5
    ry, _, rstats = add_norm_forward_reference(x, res, w, b, 1e-5, kind)
    rdx = add_norm_backward_reference(dy, dres, res_out, w, rstats, kind)
    if dtype == torch.float32:
        assert rel_err(y, y64) < fp32_tol and rel_err(dx, dx64) < fp32_tol
        assert rel_err(y, ry) < fp32_tol and rel_err(dx, rdx) < fp32_tol
    else:
        py, pdx = _plain_torch(h, None, w, b, 1e-5, kind, dy, dres)
        assert rel_err(y, y64) <= factor * rel_err(py, y64) + 1e-6
        assert rel_err(dx, dx64) <= factor * rel_err(pdx, dx64) + 1e-6


@pytest.mark.gpu
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2 ** -7)])
def test_kernel_misaligned_and_strided_inputs(kind, dtype, tol):
    rows, d = 65, 768
    flat, res, w, b = _inputs((rows * d + 1,), dtype, device="cuda", seed=9)
    # contiguous views one element off 16-byte alignment: the kernel takes its scalar path
    x, r = flat[1:].view(rows, d), res[1:].view(rows, d)
    y, res_out, stats = add_norm_forward(x, r, w[1:d + 1], b[1:d + 1], 1e-5, kind, backend="kernel")
    ry, rres, rstats = add_norm_forward_reference(x, r, w[1:d + 1], b[1:d + 1], 1e-5, kind)
    assert rel_err(y, ry) < tol and torch.equal(res_out, rres) and rel_err(stats, rstats) < 1e-5
    # a transposed (strided) input is made contiguous by the wrapper
    xt = flat[1:].view(rows, d).t()  # (d, rows): rows of width `rows`
    y, res_out, _ = add_norm_forward(xt, None, w[:rows], None, 1e-5, kind, backend="kernel")
    assert res_out is xt and rel_err(y, add_norm_forward_reference(xt, None, w[:rows], None, 1e-5, kind)[0]) < tol


@pytest.mark.gpu
def test_kernel_residual_none_returns_x_itself():
    x, _, w, _ = _inputs((3, 64), torch.bfloat16, device="cuda")
    y, res_out, stats = add_norm_forward(x, None, w, None, 1e-5, "rms", backend="kernel")
    assert res_out is x and stats[:, 0].eq(0).all()
