import pytest
import torch

from gradmem_fast.ops.memory_update import memory_update_, memory_update__reference, memory_update_op
from helpers import rel_err


def _t(shape, dtype, device="cpu", seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(shape, generator=g, dtype=torch.float64)).to(device, dtype)


def _update64(memory, grad, lr, clip_value, clip_norm):
    """Independent float64 definition, sample by sample."""
    out = memory.double().clone()
    for b in range(memory.shape[0]):
        g = grad[b].double()
        if clip_value is not None:
            g = torch.where(g > clip_value, clip_value, torch.where(g < -clip_value, -clip_value, g))
        if clip_norm is not None:
            norm = g.pow(2).sum().sqrt()
            g = g * min(1.0, clip_norm / (norm.item() + 1e-6))
        out[b] -= float(lr) * g
    return out


CLIPS = [(None, None), (0.5, None), (None, 3.0), (0.5, 3.0), (None, 1e6)]


@pytest.mark.parametrize("clip_value,clip_norm", CLIPS)
@pytest.mark.parametrize("shape", [(1, 1, 48), (3, 8, 80), (64, 8, 128)])
def test_reference_float64(clip_value, clip_norm, shape):
    memory, grad = _t(shape, torch.float64, seed=1), _t(shape, torch.float64, seed=2, scale=0.7)
    expect = _update64(memory, grad, 0.25, clip_value, clip_norm)
    grad_before = grad.clone()
    out = memory_update__reference(memory, grad, torch.tensor(0.25), clip_value=clip_value, clip_norm=clip_norm)
    assert out is memory
    assert rel_err(memory, expect) < 1e-6  # lr is float32 0.25: exact; the rest float64
    assert torch.equal(grad, grad_before)


def test_norm_clip_bounds_each_sample_step():
    memory, grad = _t((4, 8, 64), torch.float64, seed=3), _t((4, 8, 64), torch.float64, seed=4, scale=5.0)
    grad[1] *= 1e-3  # a sample below the clip keeps its gradient
    before = memory.clone()
    memory_update_(memory, grad, torch.tensor([1.0]), clip_norm=2.0)
    step = (before - memory).reshape(4, -1).norm(dim=1)
    assert (step[[0, 2, 3]] - 2.0).abs().max() < 1e-5
    assert rel_err(step[1], grad[1].norm()) < 1e-6


def test_public_cpu_and_errors():
    memory, grad = _t((2, 4, 48), torch.float32, seed=5), _t((2, 4, 48), torch.float32, seed=6)
    lr = torch.tensor(0.1)
    expect = memory_update__reference(memory.clone(), grad, lr, clip_value=0.3)
    memory_update_(memory, grad, lr, clip_value=0.3)
    assert torch.equal(memory, expect)
    with pytest.raises(ValueError, match="lr"):
        memory_update_(memory, grad, 0.1)
    with pytest.raises(ValueError, match="lr"):
        memory_update_(memory, grad, torch.tensor(0.1, dtype=torch.float64))
    with pytest.raises(ValueError, match="lr"):
        memory_update_(memory, grad, torch.ones(2))
    with pytest.raises(ValueError, match="grad"):
        memory_update_(memory, grad[:1], lr)
    with pytest.raises(ValueError, match="memory"):
        memory_update_(memory[0], grad[0], lr)
    with pytest.raises(ValueError, match="clip_norm"):
        memory_update_(memory, grad, lr, clip_norm=0.0)
    with pytest.raises(ValueError, match="clip_value"):
        memory_update_(memory, grad, lr, clip_value=-1.0)
    with pytest.raises(RuntimeError, match="cpu"):
        memory_update_(memory, grad, lr, backend="kernel")


# ---------------------------------------------------------------- csrc kernel, GPU only


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,grad_dtype,tol", [(torch.float32, torch.float32, 1e-6),
                                                  (torch.bfloat16, torch.bfloat16, 2 ** -8),
                                                  (torch.bfloat16, torch.float32, 2 ** -8),
                                                  (torch.float16, torch.float16, 2 ** -10)])
@pytest.mark.parametrize("clip_value,clip_norm", CLIPS)
@pytest.mark.parametrize("shape", [(1, 1, 48), (3, 16, 2050), (64, 8, 128), (8, 16, 2048)])
def test_kernel(dtype, grad_dtype, tol, clip_value, clip_norm, shape):
    memory = _t(shape, dtype, "cuda", seed=7)
    grad = _t(shape, grad_dtype, "cuda", seed=8, scale=0.3)
    lr = torch.tensor([0.5], device="cuda")
    expect = _update64(memory.cpu(), grad.cpu(), 0.5, clip_value, clip_norm)
    twin = memory_update__reference(memory.clone(), grad, lr, clip_value=clip_value, clip_norm=clip_norm)
    memory_update_(memory, grad, lr, clip_value=clip_value, clip_norm=clip_norm, backend="kernel")
    # one rounding of the float32 result to the memory dtype: within half an ulp of the largest value
    assert rel_err(memory.cpu(), expect) <= tol
    assert rel_err(memory, twin) <= tol


@pytest.mark.gpu
def test_kernel_graph_replay_reads_lr_on_device():
    memory = _t((4, 8, 256), torch.float32, "cuda", seed=9)
    grad = _t((4, 8, 256), torch.float32, "cuda", seed=10)
    lr = torch.tensor(0.0, device="cuda")
    start = memory.clone()
    memory_update_(memory, grad, lr, clip_norm=1.0, backend="kernel")  # warm-up outside capture
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.cuda.graph(graph):
        memory_update_(memory, grad, lr, clip_norm=1.0, backend="kernel", validate=False)
    torch.cuda.current_stream().wait_stream(stream)
    memory.copy_(start)
    lr.fill_(0.25)
    graph.replay()
    expect = _update64(start.cpu(), grad.cpu(), 0.25, None, 1.0)
    assert rel_err(memory.cpu(), expect) < 1e-6


@pytest.mark.gpu
def test_cuda_fallback_to_twin_warns():
    from gradmem_fast import backends
    from gradmem_fast.ops.memory_update import memory_update_

    memory = torch.randn(2, 3, 8, dtype=torch.float64, device="cuda")
    grad = torch.randn_like(memory)
    backends._warned.clear()
    with pytest.warns(UserWarning, match="using the PyTorch twin"):
        memory_update_(memory, grad, torch.tensor(0.1, device="cuda"))


# ---------------------------------------------------------------- memory_update_op (differentiable)


def _op_inputs(shape, seed, zero_sample=False):
    memory = _t(shape, torch.float64, seed=seed).requires_grad_(True)
    grad = _t(shape, torch.float64, seed=seed + 1, scale=0.7)
    if zero_sample:
        grad[0] = 0.0
    return memory, grad.requires_grad_(True), torch.tensor(0.3, dtype=torch.float64)


@pytest.mark.parametrize("clip_value,clip_norm", CLIPS + [(0.5, 0.2)])
def test_op_gradcheck_and_gradgradcheck(clip_value, clip_norm):
    memory, grad, lr = _op_inputs((2, 3, 4), seed=3)

    def f(m, g):
        return memory_update_op(m, g, lr, clip_value=clip_value, clip_norm=clip_norm)

    assert torch.autograd.gradcheck(f, (memory, grad))
    assert torch.autograd.gradgradcheck(f, (memory, grad))


@pytest.mark.parametrize("clip_value,clip_norm", CLIPS + [(0.5, 0.2), (None, 0.2)])
@pytest.mark.parametrize("zero_sample", [False, True])
def test_op_backward_matches_autograd_of_the_twin(clip_value, clip_norm, zero_sample):
    # 0.7 randn: some entries beyond clip_value 0.5; the samples' norms are 2.4 to 2.9 (1.5 to 1.7 after the
    # value clip): clip_norm 3 and 1e6 leave them, 0.2 scales every one; a zero sample has no norm gradient
    memory, grad, lr = _op_inputs((3, 4, 4), seed=5, zero_sample=zero_sample)
    out = memory_update_op(memory, grad, lr, clip_value=clip_value, clip_norm=clip_norm)
    want_out = memory_update__reference(memory.clone(), grad, lr, clip_value=clip_value, clip_norm=clip_norm)
    assert torch.equal(out, want_out)
    seed = _t(out.shape, torch.float64, seed=9)
    got = torch.autograd.grad(out, (memory, grad), seed)
    want = torch.autograd.grad(want_out, (memory, grad), seed)
    for a, b in zip(got, want):
        assert rel_err(a, b) < 1e-12
    if clip_value is not None:  # the clip is active somewhere, and where it is the gradient is zero
        beyond = grad.detach().abs() > clip_value
        assert beyond.any() and (got[1][beyond] == 0).all()


def test_op_float32_and_errors():
    memory, grad, lr = (t.detach().float() for t in _op_inputs((2, 3, 4), seed=7))
    grad.requires_grad_(True)
    out = memory_update_op(memory, grad, lr.float(), clip_value=0.5, clip_norm=1.0)
    assert out.dtype == torch.float32
    (d,) = torch.autograd.grad(out.sum(), grad)
    assert d.dtype == torch.float32
    with pytest.raises(ValueError, match="grad"):
        memory_update_op(memory, grad.double(), lr)
    with pytest.raises(ValueError, match="clip_norm"):
        memory_update_op(memory, grad, lr, clip_norm=0.0)
    with pytest.raises(ValueError, match="lr"):
        memory_update_op(memory, grad, 0.1)
    with pytest.raises(ValueError, match="lr requires grad"):
        memory_update_op(memory, grad, lr.float().requires_grad_(True))
