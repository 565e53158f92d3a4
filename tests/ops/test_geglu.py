"""GeGLU (tanh GELU): the twin against autograd in float64, the Triton kernel (interpreter on CPU) against
the float64 twin, the fp16 error against plain PyTorch's, bad arguments."""
import pytest
import torch
import torch.nn.functional as F

from gradmem_fast.ops.geglu import geglu_backward, geglu_backward_reference, geglu_forward, geglu_forward_reference
from helpers import poison_, rel_err


def _inputs(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    gate, up, dy = (3.0 * torch.randn(*shape, generator=g, dtype=torch.float64) for _ in range(3))
    gate[..., 0] = 12.0  # tanh saturating at both ends
    gate[..., -1] = -12.0
    return gate.to(dtype), up.to(dtype), dy.to(dtype)


def test_twin_matches_autograd_float64():
    gate, up, dy = _inputs((3, 7, 24), torch.float64)
    g, u = gate.clone().requires_grad_(True), up.clone().requires_grad_(True)
    y = F.gelu(g, approximate="tanh") * u
    y.backward(dy)
    assert rel_err(geglu_forward_reference(gate, up), y.detach()) < 1e-14
    d_gate, d_up = geglu_backward_reference(dy, gate, up)
    assert rel_err(d_gate, g.grad) < 1e-13 and rel_err(d_up, u.grad) < 1e-13


@pytest.mark.parametrize("shape", [(1, 1), (2, 37, 24), (1, 1025), (3, 5, 100)])
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-6), (torch.float16, 2e-3)])
def test_kernel_matches_twin(shape, dtype, tol):
    pytest.importorskip("triton")
    gate, up, dy = _inputs(shape, dtype, seed=len(shape))
    y_ref = geglu_forward_reference(gate.double(), up.double())
    dg_ref, du_ref = geglu_backward_reference(dy.double(), gate.double(), up.double())
    out = poison_(torch.empty(shape, dtype=dtype))
    y = geglu_forward(gate, up, out=out, backend="kernel")
    assert y is out and rel_err(y, y_ref) < tol
    outs = (poison_(torch.empty(shape, dtype=dtype)), poison_(torch.empty(shape, dtype=dtype)))
    d_gate, d_up = geglu_backward(dy, gate, up, out=outs, backend="kernel")
    assert d_gate is outs[0] and rel_err(d_gate, dg_ref) < tol and rel_err(d_up, du_ref) < tol


def test_fp16_kernel_within_twice_plain_pytorch():
    gate, up, _ = _inputs((4, 64), torch.float16, seed=3)
    ref = geglu_forward_reference(gate.double(), up.double())
    plain = F.gelu(gate, approximate="tanh") * up
    assert rel_err(geglu_forward(gate, up, backend="kernel"), ref) <= 2 * rel_err(plain, ref) + 1e-4


def test_float64_takes_the_twin_with_a_warning_and_kernel_refuses():
    gate, up, dy = _inputs((2, 16), torch.float64)
    with pytest.warns(UserWarning, match="float64"):
        y = geglu_forward(gate, up, backend="auto")
    assert torch.equal(y, geglu_forward_reference(gate, up))
    with pytest.raises(RuntimeError, match="float64"):
        geglu_backward(dy, gate, up, backend="kernel")


def test_bad_arguments():
    gate, up, _ = _inputs((2, 16), torch.float32)
    with pytest.raises(ValueError, match="up"):
        geglu_forward(gate, up[:, :8])
    with pytest.raises(ValueError, match="out"):
        geglu_forward(gate, up, out=torch.empty(2, 8))
    with pytest.raises(ValueError, match="backend"):
        geglu_forward(gate, up, backend="fastest")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_kernel_on_cuda(dtype):
    gate, up, dy = (t.to("cuda", dtype) for t in _inputs((3, 77, 320), torch.float64, seed=9))
    y_ref = geglu_forward_reference(gate.double(), up.double())
    dg_ref, du_ref = geglu_backward_reference(dy.double(), gate.double(), up.double())
    plain = F.gelu(gate, approximate="tanh") * up
    floor = 1e-6 if dtype == torch.float32 else 0.0
    assert rel_err(geglu_forward(gate, up, backend="kernel"), y_ref) <= 2 * rel_err(plain, y_ref) + floor
    d_gate, d_up = geglu_backward(dy, gate, up, backend="kernel")
    dg_plain, du_plain = geglu_backward_reference(dy, gate, up)
    assert rel_err(d_gate, dg_ref) <= 2 * rel_err(dg_plain, dg_ref) + floor
    assert rel_err(d_up, du_ref) <= 2 * rel_err(du_plain, du_ref) + floor
