"""fused_head_loss: per-row cross-entropy of an LM head and its hidden-state gradient.

CPU runs the Triton kernels under the interpreter at tiny shapes (fp32, fp16); the gpu-marked tests
cover bf16, the real head shapes, CUDA-graph capture and the memory bound.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from gradmem_fast.ops.head_loss import fused_head_loss, fused_head_loss_reference
from helpers import poison_, rel_err

pytestmark = pytest.mark.needs_triton  # every kernel test here launches Triton (interpreter or GPU)

IMPLS = ("chunked", "fused", "public", "twin")
SHAPES = [(37, 97, 48), (20, 1000, 80), (1, 97, 48)]  # (N, V, d)


def make_inputs(N, V, d, dtype, seed, device="cpu", zero_rows=(), hidden_scale=1.0, weight_scale=0.3):
    """hidden and weight rounded to `dtype` (float64 copies of the rounded values for the reference),
    targets hitting 0 and V-1, ragged 1/L_b row weights with 0 on padding rows."""
    g = torch.Generator().manual_seed(seed)
    h64 = (hidden_scale * torch.randn(N, d, generator=g, dtype=torch.float64)).to(dtype).double()
    w64 = (weight_scale * torch.randn(V, d, generator=g, dtype=torch.float64)).to(dtype).double()
    targets = torch.randint(0, V, (N,), generator=g)
    targets[0] = 0
    targets[-1] = V - 1
    if N > 2:
        targets[N // 2] = V - 1
    # samples of ragged length: row i belongs to sample i % 3, sample b has lengths[b] real rows
    sample = torch.arange(N) % 3
    counts = torch.bincount(sample, minlength=3).double()
    lengths = torch.clamp(counts - torch.tensor([0.0, 2.0, 5.0]), min=1.0)
    rank = torch.zeros(N, dtype=torch.float64)
    for b in range(3):
        rank[sample == b] = torch.arange(int(counts[b]), dtype=torch.float64)
    row_weights = torch.where(rank < lengths[sample], 1.0 / lengths[sample], 0.0).float()
    for i in zero_rows:
        row_weights[i] = 0.0
    dev = torch.device(device)
    return (h64.to(dtype).to(dev), w64.to(dtype).to(dev), targets.to(dev), row_weights.to(dev),
            h64.to(dev), w64.to(dev))


def run_impl(impl, hidden, weight, targets, row_weights, loss_out=None, grad_out=None, **kw):
    if impl in ("public", "twin"):
        return fused_head_loss(hidden, weight, targets, row_weights, loss_out=loss_out, grad_out=grad_out,
                               backend="kernel" if impl == "public" else "reference")
    from gradmem_fast.kernels.head_loss import head_loss

    loss = poison_(torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)) \
        if loss_out is None else loss_out
    grad = poison_(torch.empty_like(hidden)) if grad_out is None else grad_out
    head_loss(hidden, weight, targets, row_weights, loss, grad, method=impl, **kw)
    return loss, grad


def plain_torch(hidden, weight, targets, row_weights):
    """The unfused computation in the inputs' dtype: logits GEMM, fp32 cross-entropy, autograd."""
    h = hidden.detach().requires_grad_(True)
    logits = h @ weight.t()
    loss = F.cross_entropy(logits.float(), targets, reduction="none")
    (grad,) = torch.autograd.grad((loss * row_weights).sum(), h)
    return loss.detach(), grad


def live_rel_err(x, ref, live):
    return rel_err(x[live], ref[live])

def assert_accuracy(loss, grad, loss_ref, grad_ref, live, inputs, rtol, ratio):
    """fp32: relative error under rtol; half precision: within `ratio` x the plain torch error."""
    err_loss = live_rel_err(loss, loss_ref, live)
    err_grad = rel_err(grad, grad_ref)
    if rtol is not None:
        assert err_loss < rtol and err_grad < rtol, (err_loss, err_grad)
    else:
        plain_loss, plain_grad = plain_torch(*inputs)
        assert err_loss <= ratio * live_rel_err(plain_loss, loss_ref, live), err_loss
        assert err_grad <= ratio * rel_err(plain_grad, grad_ref), err_grad



@pytest.mark.parametrize("dtype, rtol, ratio", [(torch.float32, 1e-5, None), (torch.float16, None, 2.0)])
@pytest.mark.parametrize("N, V, d", SHAPES)
@pytest.mark.parametrize("impl", IMPLS)
def test_matches_float64(impl, N, V, d, dtype, rtol, ratio):
    hidden, weight, targets, row_weights, h64, w64 = make_inputs(N, V, d, dtype, seed=N + V + d)
    loss_ref, grad_ref = fused_head_loss_reference(h64, w64, targets, row_weights.double())
    loss, grad = run_impl(impl, hidden, weight, targets, row_weights, chunk_rows=16) if impl == "chunked" \
        else run_impl(impl, hidden, weight, targets, row_weights)
    assert loss.dtype == torch.float32 and grad.dtype == dtype
    live = row_weights != 0
    assert (loss[~live] == 0).all() and (grad[~live] == 0).all()
    assert_accuracy(loss, grad, loss_ref, grad_ref, live, (hidden, weight, targets, row_weights), rtol, ratio)


@pytest.mark.parametrize("dtype, rtol, ratio", [(torch.float32, 1e-5, None), (torch.float16, None, 2.0)])
@pytest.mark.parametrize("impl", IMPLS)
def test_confident_rows(impl, dtype, rtol, ratio):
    # p_t close to 1: the gradient w (p - e_t) W is small and must not drown in the rounding of p_t
    N, V, d = 37, 97, 48
    hidden, weight, targets, row_weights, h64, w64 = make_inputs(N, V, d, dtype, seed=53)
    h64 = (h64 + 12.0 * w64[targets] / w64[targets].norm(dim=1, keepdim=True)).to(dtype).double()
    hidden = h64.to(dtype)
    loss_ref, grad_ref = fused_head_loss_reference(h64, w64, targets, row_weights.double())
    live = row_weights != 0
    assert loss_ref[live].max() < 1e-2  # the regime this test is about
    loss, grad = run_impl(impl, hidden, weight, targets, row_weights)
    assert_accuracy(loss, grad, loss_ref, grad_ref, live, (hidden, weight, targets, row_weights), rtol, ratio)


def test_reference_matches_autograd():
    hidden, weight, targets, row_weights, h64, w64 = make_inputs(29, 61, 24, torch.float64, seed=3)
    h = h64.clone().requires_grad_(True)
    ce = F.cross_entropy(h @ w64.t(), targets, reduction="none")
    (grad_auto,) = torch.autograd.grad((ce * row_weights.double()).sum(), h)
    loss, grad = fused_head_loss_reference(h64, w64, targets, row_weights.double())
    live = row_weights != 0
    assert torch.allclose(loss[live], ce.detach()[live], rtol=1e-12, atol=1e-12)
    assert (loss[~live] == 0).all()
    assert torch.allclose(grad, grad_auto, rtol=1e-12, atol=1e-12)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy sees the NaN rows
@pytest.mark.parametrize("impl", IMPLS)
def test_zero_weight_rows_ignore_hidden_and_targets(impl):
    # rows 16..31 fill a whole row block of the interpreter's fused kernel; NaN hidden rows and
    # out-of-range targets must not leak anywhere
    N, V, d = 37, 97, 48
    zero = list(range(16, 32)) + [2, 33]
    hidden, weight, targets, row_weights, h64, w64 = make_inputs(N, V, d, torch.float32, seed=7, zero_rows=zero)
    loss_ref, grad_ref = fused_head_loss_reference(h64, w64, targets, row_weights.double())
    hidden[2] = math.nan
    hidden[20] = math.nan
    targets[2] = -100
    targets[17] = V
    loss, grad = run_impl(impl, hidden, weight, targets, row_weights)
    assert (loss[zero] == 0).all() and (grad[zero] == 0).all()
    assert rel_err(loss, loss_ref) < 1e-5 and rel_err(grad, grad_ref) < 1e-5


@pytest.mark.parametrize("impl", IMPLS)
def test_all_rows_zero_weight(impl):
    hidden, weight, targets, _, _, _ = make_inputs(21, 97, 48, torch.float32, seed=11)
    loss, grad = run_impl(impl, hidden, weight, targets, torch.zeros(21))
    assert (loss == 0).all() and (grad == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("impl", IMPLS)
def test_writes_into_poisoned_outputs(impl, dtype):
    hidden, weight, targets, row_weights, h64, w64 = make_inputs(37, 97, 48, dtype, seed=5)
    loss_out = poison_(torch.empty(37, dtype=torch.float32))
    grad_out = poison_(torch.empty(37, 48, dtype=dtype))
    loss, grad = run_impl(impl, hidden, weight, targets, row_weights, loss_out=loss_out, grad_out=grad_out)
    assert loss is loss_out and grad is grad_out
    loss_ref, grad_ref = fused_head_loss_reference(h64, w64, targets, row_weights.double())
    assert rel_err(loss, loss_ref) < 5e-3 and rel_err(grad, grad_ref) < 5e-3


def test_chunked_reuses_poisoned_workspace_over_ragged_chunks():
    from gradmem_fast.kernels.head_loss import ROW_ALIGN

    N, V, d = 37, 97, 48
    hidden, weight, targets, row_weights, h64, w64 = make_inputs(N, V, d, torch.float32, seed=13)
    ld = -(-V // ROW_ALIGN) * ROW_ALIGN
    workspace = poison_(torch.empty(10 * ld))
    loss_ref, grad_ref = fused_head_loss_reference(h64, w64, targets, row_weights.double())
    for _ in range(2):  # 4 chunks of 10, 10, 10, 7 rows, then the same buffer again
        loss, grad = run_impl("chunked", hidden, weight, targets, row_weights, chunk_rows=10, workspace=workspace)
        assert rel_err(loss, loss_ref) < 1e-5 and rel_err(grad, grad_ref) < 1e-5


def test_fused_reuses_poisoned_accumulator():
    N, V, d = 37, 97, 48
    hidden, weight, targets, row_weights, h64, w64 = make_inputs(N, V, d, torch.float32, seed=17)
    acc = poison_(torch.empty(N * d))
    loss, grad = run_impl("fused", hidden, weight, targets, row_weights, workspace=acc)
    loss_ref, grad_ref = fused_head_loss_reference(h64, w64, targets, row_weights.double())
    assert rel_err(loss, loss_ref) < 1e-5 and rel_err(grad, grad_ref) < 1e-5


def test_method_from_environment(monkeypatch):
    from gradmem_fast.kernels import head_loss as kernels

    hidden, weight, targets, row_weights, h64, w64 = make_inputs(19, 97, 48, torch.float32, seed=19)
    seen = []
    monkeypatch.setattr(kernels, "_fused", lambda *a: seen.append("fused"))
    monkeypatch.setenv(kernels.ENV_METHOD, "fused")
    fused_head_loss(hidden, weight, targets, row_weights, backend="kernel")
    assert seen == ["fused"]
    monkeypatch.setenv(kernels.ENV_METHOD, "nonsense")
    with pytest.raises(ValueError, match="nonsense"):
        fused_head_loss(hidden, weight, targets, row_weights, backend="kernel")


def test_empty_rows():
    weight = torch.randn(97, 48)
    loss, grad = fused_head_loss(torch.empty(0, 48), weight, torch.empty(0, dtype=torch.int64), torch.empty(0))
    assert loss.shape == (0,) and grad.shape == (0, 48)


def test_dispatch_without_interpreter(monkeypatch):
    hidden, weight, targets, row_weights, h64, w64 = make_inputs(13, 97, 48, torch.float32, seed=23)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        fused_head_loss(hidden, weight, targets, row_weights, backend="kernel")
    loss, grad = fused_head_loss(hidden, weight, targets, row_weights)  # auto: the twin
    loss_ref, grad_ref = fused_head_loss_reference(hidden, weight, targets, row_weights)
    assert torch.equal(loss, loss_ref) and torch.equal(grad, grad_ref)


def test_bfloat16_on_cpu_takes_the_twin():
    hidden, weight, targets, row_weights, h64, w64 = make_inputs(13, 97, 48, torch.bfloat16, seed=29)
    loss, grad = fused_head_loss(hidden, weight, targets, row_weights)
    loss_ref, grad_ref = fused_head_loss_reference(hidden, weight, targets, row_weights)
    assert grad.dtype == torch.bfloat16
    assert torch.equal(loss, loss_ref) and torch.equal(grad, grad_ref)
    if torch.cuda.is_available():
        return
    with pytest.raises(RuntimeError, match="bfloat16"):
        fused_head_loss(hidden, weight, targets, row_weights, backend="kernel")


def test_float64_takes_the_twin():
    _, _, targets, row_weights, h64, w64 = make_inputs(13, 97, 48, torch.float64, seed=31)
    loss, grad = fused_head_loss(h64, w64, targets, row_weights)
    assert grad.dtype == torch.float64
    with pytest.raises(RuntimeError, match="float64"):
        fused_head_loss(h64, w64, targets, row_weights, backend="kernel")


def _bad_calls():
    h = torch.randn(5, 8)
    w = torch.randn(11, 8)
    t = torch.tensor([0, 1, 2, 10, 4])
    rw = torch.ones(5)
    yield "backend", (h, w, t, rw), dict(backend="fast")
    yield "hidden", (h[None], w, t, rw), {}
    yield "hidden dtype", (h.long(), w.long(), t, rw), {}
    yield "weight", (h, torch.randn(11, 9), t, rw), {}
    yield "weight", (h, torch.randn(11), t, rw), {}
    yield "weight dtype", (h, w.half(), t, rw), {}
    yield "targets", (h, w, t.int(), rw), {}
    yield "targets", (h, w, t[:4], rw), {}
    yield "row_weights", (h, w, t, rw.half()), {}
    yield "row_weights", (h, w, t, torch.ones(5, 1)), {}
    yield r"targets\[3\] = 11", (h, w, torch.tensor([0, 1, 2, 11, 4]), rw), {}
    yield r"targets\[1\] = -1", (h, w, torch.tensor([0, -1, 2, 3, 4]), rw), {}
    yield "loss_out", (h, w, t, rw), dict(loss_out=torch.empty(4))
    yield "loss_out", (h, w, t, rw), dict(loss_out=torch.empty(5, dtype=torch.float64))
    yield "grad_out", (h, w, t, rw), dict(grad_out=torch.empty(5, 8).half())
    yield "grad_out", (h, w, t, rw), dict(grad_out=torch.empty(8, 5).t())
    yield "hidden must be a tensor", (h.tolist(), w, t, rw), {}
    yield "weight is on meta", (h, w.to("meta"), t, rw), {}


@pytest.mark.parametrize("match, args, kwargs", list(_bad_calls()))
def test_validation_errors(match, args, kwargs):
    with pytest.raises(ValueError, match=match):
        fused_head_loss(*args, **kwargs)


def test_out_of_range_target_allowed_on_zero_weight_row():
    h, w = torch.randn(3, 8), torch.randn(11, 8)
    loss, grad = fused_head_loss(h, w, torch.tensor([0, 11, 2]), torch.tensor([1.0, 0.0, 0.5]))
    assert loss[1] == 0 and (grad[1] == 0).all() and torch.isfinite(grad).all()


# ---------------------------------------------------------------- GPU (H100 / H200)

GPU_HEADS = [pytest.param(768, 50257, id="gpt2"), pytest.param(2048, 128256, id="llama1b")]
GPU_IMPLS = ("chunked", "fused", "public", "twin")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, ratio", [(torch.bfloat16, 2.0), (torch.float16, 2.0)])
@pytest.mark.parametrize("d, V", GPU_HEADS)
@pytest.mark.parametrize("impl", GPU_IMPLS)
def test_gpu_within_twice_plain_torch_error(impl, d, V, dtype, ratio):
    N = 333
    hidden, weight, targets, row_weights, h64, w64 = make_inputs(
        N, V, d, dtype, seed=d, device="cuda", zero_rows=(5, 6), hidden_scale=2.0, weight_scale=0.05)
    loss_ref, grad_ref = fused_head_loss_reference(h64, w64, targets, row_weights.double())
    loss, grad = run_impl(impl, hidden, weight, targets, row_weights)
    plain_loss, plain_grad = plain_torch(hidden, weight, targets, row_weights)
    live = row_weights != 0
    assert live_rel_err(loss, loss_ref, live) <= ratio * live_rel_err(plain_loss, loss_ref, live)
    assert rel_err(grad, grad_ref) <= ratio * rel_err(plain_grad, grad_ref)
    assert (loss[~live] == 0).all() and (grad[~live] == 0).all()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, ratio", [(torch.bfloat16, 2.0)])
@pytest.mark.parametrize("method", ["chunked", "fused"])
def test_gpu_documented_limits(method, dtype, ratio):
    """The largest head the op documents, V = 256k and d = 4096, with inputs made on the card."""
    N, V, d = 300, 256 * 1024, 4096
    g = torch.Generator(device="cuda").manual_seed(59)
    hidden = (2.0 * torch.randn(N, d, generator=g, device="cuda")).to(dtype)
    weight = (0.02 * torch.randn(V, d, generator=g, device="cuda")).to(dtype)
    targets = torch.randint(0, V, (N,), generator=g, device="cuda")
    targets[-1] = V - 1
    row_weights = torch.full((N,), 1.0 / N, device="cuda")
    row_weights[:7] = 0.0
    loss_ref, grad_ref = fused_head_loss_reference(hidden.double(), weight.double(), targets, row_weights.double())
    loss, grad = run_impl(method, hidden, weight, targets, row_weights)
    live = row_weights != 0
    assert_accuracy(loss, grad, loss_ref, grad_ref, live, (hidden, weight, targets, row_weights), None, ratio)
    assert (loss[~live] == 0).all() and (grad[~live] == 0).all()


@pytest.mark.gpu
@pytest.mark.parametrize("rtol", [1e-5])
@pytest.mark.parametrize("impl", GPU_IMPLS)
def test_gpu_float32_is_true_float32(impl, rtol):
    # set by hand: some torch versions (2.11) refuse to read allow_tf32 back, which monkeypatch does
    torch.backends.cuda.matmul.allow_tf32 = False  # the default
    hidden, weight, targets, row_weights, h64, w64 = make_inputs(
        200, 50257, 768, torch.float32, seed=37, device="cuda", hidden_scale=2.0, weight_scale=0.05)
    loss_ref, grad_ref = fused_head_loss_reference(h64, w64, targets, row_weights.double())
    loss, grad = run_impl(impl, hidden, weight, targets, row_weights)
    assert rel_err(loss, loss_ref) < rtol and rel_err(grad, grad_ref) < rtol


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["chunked", "fused"])
def test_gpu_cuda_graph_replay(method, monkeypatch):
    from gradmem_fast.kernels.head_loss import ENV_METHOD

    monkeypatch.setenv(ENV_METHOD, method)
    N, V, d = 1000, 50257, 768
    hidden, weight, targets, row_weights, _, _ = make_inputs(N, V, d, torch.bfloat16, seed=41, device="cuda")
    loss_out = torch.empty(N, dtype=torch.float32, device="cuda")
    grad_out = torch.empty_like(hidden)
    call = lambda: fused_head_loss(hidden, weight, targets, row_weights, loss_out=loss_out,  # noqa: E731
                                   grad_out=grad_out, validate=False)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        call()  # compile and warm up outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        call()
    new_hidden, _, new_targets, new_rw, _, _ = make_inputs(N, V, d, torch.bfloat16, seed=43, device="cuda",
                                                           zero_rows=range(0, 300))
    hidden.copy_(new_hidden)
    targets.copy_(new_targets)
    row_weights.copy_(new_rw)
    poison_(loss_out)
    poison_(grad_out)
    graph.replay()
    torch.cuda.synchronize()
    loss_eager, grad_eager = fused_head_loss(new_hidden, weight, new_targets, new_rw)
    assert torch.equal(loss_out, loss_eager) and torch.equal(grad_out, grad_eager)


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["chunked", "fused"])
def test_gpu_extra_memory_is_bounded(method):
    from gradmem_fast.kernels.head_loss import CHUNK_BYTES, head_loss

    N, V, d = 16384, 50257, 768
    hidden, weight, targets, row_weights, _, _ = make_inputs(N, V, d, torch.bfloat16, seed=47, device="cuda")
    loss = torch.empty(N, dtype=torch.float32, device="cuda")
    grad = torch.empty_like(hidden)
    head_loss(hidden, weight, targets, row_weights, loss, grad, method=method)  # compile first
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    head_loss(hidden, weight, targets, row_weights, loss, grad, method=method)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    bound = (CHUNK_BYTES if method == "chunked" else N * d * 4) + (8 << 20)
    assert extra <= bound, (extra, bound)
    assert extra < N * V * 2 / 4  # far below even one bf16 copy of the logits


@pytest.mark.gpu
def test_cuda_fallback_to_twin_warns():
    import gradmem_fast.ops.head_loss as op
    from gradmem_fast import backends

    h = torch.randn(5, 16, dtype=torch.float64, device="cuda")
    w = torch.randn(11, 16, dtype=torch.float64, device="cuda")
    t = torch.randint(0, 11, (5,), device="cuda")
    rw = torch.full((5,), 0.2, device="cuda")
    backends._warned.clear()
    with pytest.warns(UserWarning, match="using the PyTorch twin"):
        op.fused_head_loss(h, w, t, rw)
