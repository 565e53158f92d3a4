"""csrc add_norm kernels run by the CPU emulator, checked as tests/ops/test_add_norm.py checks them on a GPU
(same helpers, tolerances and widths; fewer rows, since the emulator is slow)."""
import pytest
import torch

import gpu_tests
from gradmem_fast.ops.add_norm import (add_norm_backward, add_norm_backward_reference, add_norm_forward,
                                       add_norm_forward_reference)
from helpers import poison_, rel_err

T = gpu_tests.load("add_norm")
# every width of the GPU tests; 37 rows only where rows are cheap
SHAPES = [(37, 48), (1, 80), (3, 80), (3, 768), (1, 2048), (3, 2048), (3, 2050)]
assert {d for _, d in SHAPES} == set(T.WIDTHS)


@pytest.mark.parametrize("dtype,factor,fp32_tol", [(torch.float32, None, 1e-5), (torch.bfloat16, 2.0, None),
                                                   (torch.float16, 2.0, None)])
@pytest.mark.parametrize("kind", T.KINDS)
@pytest.mark.parametrize("rows,d", SHAPES)
@pytest.mark.parametrize("with_res,with_bias", [(True, True), (False, False), (True, False), (False, True)])
def test_kernel_against_float64(emulated, dtype, factor, fp32_tol, kind, rows, d, with_res, with_bias):
    x, res, w, b = T._inputs((rows, d), dtype, seed=d + rows, bias=with_bias, residual=with_res)
    g = torch.Generator().manual_seed(7)
    dy = torch.randn(rows, d, generator=g).to(dtype)
    dres = torch.randn(rows, d, generator=g).to(dtype)
    T.check_kernel(x, res, w, b, dy, dres, kind, dtype, factor, fp32_tol)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2 ** -7), (torch.float16, 2 ** -10)])
@pytest.mark.parametrize("kind", T.KINDS)
@pytest.mark.parametrize("d", [768, 80])
def test_backward_without_d_residual_out(emulated, dtype, tol, kind, d):
    x, res, w, b = T._inputs((3, d), dtype, seed=11, bias=True, residual=True)
    dy = torch.randn(3, d, generator=torch.Generator().manual_seed(12)).to(dtype)
    y, res_out, stats = add_norm_forward(x, res, w, b, 1e-5, kind, backend="kernel")
    dx = add_norm_backward(dy, None, res_out, w, stats, kind, out=poison_(torch.empty_like(x)), backend="kernel")
    assert rel_err(dx, add_norm_backward_reference(dy, None, res_out, w, stats, kind)) < tol


@pytest.mark.parametrize("kind", T.KINDS)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2 ** -7)])
def test_kernel_misaligned_and_strided_inputs(emulated, kind, dtype, tol):
    rows, d = 5, 768
    flat, res, w, b = T._inputs((rows * d + 1,), dtype, seed=9)
    # contiguous views one element off 16-byte alignment: the kernel takes its scalar path
    x, r = flat[1:].view(rows, d), res[1:].view(rows, d)
    y, res_out, stats = add_norm_forward(x, r, w[1:d + 1], b[1:d + 1], 1e-5, kind, backend="kernel")
    ry, rres, rstats = add_norm_forward_reference(x, r, w[1:d + 1], b[1:d + 1], 1e-5, kind)
    assert rel_err(y, ry) < tol and torch.equal(res_out, rres) and rel_err(stats, rstats) < 1e-5
    dy = T._inputs((rows, d), dtype, seed=10)[0]
    dx = add_norm_backward(dy, None, res_out, w[1:d + 1], stats, kind, backend="kernel")
    assert rel_err(dx, add_norm_backward_reference(dy, None, res_out, w[1:d + 1], rstats, kind)) < tol
    # a transposed (strided) input (d, rows) is made contiguous by the wrapper
    xt = flat[1:].view(rows, d).t()
    y, res_out, _ = add_norm_forward(xt, None, w[:rows], None, 1e-5, kind, backend="kernel")
    assert res_out is xt and rel_err(y, add_norm_forward_reference(xt, None, w[:rows], None, 1e-5, kind)[0]) < tol


def test_kernel_residual_none_returns_x_itself(emulated):
    x, _, w, _ = T._inputs((3, 64), torch.bfloat16)
    y, res_out, stats = add_norm_forward(x, None, w, None, 1e-5, "rms", backend="kernel")
    assert res_out is x and stats[:, 0].eq(0).all()


def test_rows_wider_than_the_register_cache(emulated):
    # d / VEC > kCap * 512 threads: every thread re-reads part of its row from memory
    rows, d = 2, 4 * 512 * 4 + 36
    x, res, w, b = T._inputs((rows, d), torch.float32, seed=13)
    dy = torch.randn(rows, d, generator=torch.Generator().manual_seed(14))
    for kind in T.KINDS:
        y, res_out, stats = add_norm_forward(x, res, w, b, 1e-5, kind, backend="kernel")
        dx = add_norm_backward(dy, res, res_out, w, stats, kind, backend="kernel")
        up = lambda t: t.double()
        y64, dx64 = T._plain_torch(up(x + res), None, up(w), up(b), 1e-5, kind, up(dy), up(res))
        assert rel_err(y, y64) < 1e-5 and rel_err(dx, dx64) < 1e-5


@pytest.mark.parametrize("dtype,factor,fp32_tol", [(torch.float32, None, 1e-5), (torch.bfloat16, 2.0, None),
                                                   (torch.float16, 2.0, None)])
@pytest.mark.parametrize("kind", T.KINDS)
@pytest.mark.parametrize("layout", ["samples", "rows", "blocks"])
@pytest.mark.parametrize("B,m,d", [(1, 4, 48), (3, 4, 768), (2, 2, 2050)])
@pytest.mark.parametrize("offset", [0, 1])  # 1: misaligned rows, the scalar path
def test_kernel_strided_d_residual_out(emulated, dtype, factor, fp32_tol, kind, layout, B, m, d, offset):
    T._check_strided_d_residual_out("kernel", "cpu", dtype, factor, fp32_tol, kind, layout, B, m, d, offset)


def test_kernel_rejects_a_bad_d_residual_out(emulated):
    """The host checks name the value: a wrong shape and a non-contiguous last dimension."""
    x, _, w, _ = T._inputs((4, 48), torch.float32)
    _, res_out, stats = add_norm_forward(x, None, w, None, 1e-5, "rms", backend="kernel")
    dx = torch.empty_like(x)
    with pytest.raises(RuntimeError, match="d_residual_out"):
        emulated.add_norm_bwd(x, torch.zeros(5, 48), res_out, w, stats, True, dx)
    with pytest.raises(RuntimeError, match="d_residual_out's last dimension"):
        emulated.add_norm_bwd(x, torch.zeros(48, 4).t(), res_out, w, stats, True, dx)


@pytest.mark.parametrize("layout,launches", [("samples", {"csrc": 1}), ("rows", {"csrc": 1}),
                                             ("blocks", {"csrc": 1, "aten": 1})])
def test_strided_d_residual_out_is_read_in_place(emulated, layout, launches):
    """Row views reach the kernel as they are (one launch); only a layout with no row view is copied first."""
    from gradmem_fast.engine.launches import LaunchCounter

    dres, _ = T._strided_d_residual_out(layout, 3, 4, 48, torch.float32, "cpu", seed=1, offset=0)
    x, _, w, _ = T._inputs(dres.shape, torch.float32)
    _, res_out, stats = add_norm_forward(x, None, w, None, 1e-5, "layer", backend="kernel")
    dx = torch.empty_like(x)
    counter = LaunchCounter()
    with counter:
        add_norm_backward(x, dres, res_out, w, stats, "layer", out=dx, backend="kernel", validate=False)
    assert dict(counter.by("kind")) == launches
