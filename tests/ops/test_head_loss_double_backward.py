"""head_loss_op and its backward in float64 on the CPU: agreement with autograd differentiating full logits,
gradcheck and gradgradcheck, what the op saves and holds, second-order gradients of a composition, bad
arguments. The Triton kernels are tested in test_head_loss_double_backward_kernel.py."""
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import gradmem_fast.ops.head_loss_double_backward as op
from gradmem_fast.ops.head_loss import fused_head_loss_reference
from gradmem_fast.ops.head_loss_double_backward import (head_loss_double_backward,
                                                         head_loss_double_backward_reference, head_loss_op)
from helpers import rel_err


def make_inputs(N, V, d, dtype, seed, device="cpu", zero_rows=(), hidden_scale=1.0, weight_scale=0.3):
    """hidden, weight and grad_bar rounded to dtype, their float64 copies, targets hitting 0 and V-1, row
    weights 1/L_b of three ragged samples (0 on their padding rows and on zero_rows), loss_bar float64."""
    g = torch.Generator().manual_seed(seed)
    h64 = (hidden_scale * torch.randn(N, d, generator=g, dtype=torch.float64)).to(dtype).double()
    w64 = (weight_scale * torch.randn(V, d, generator=g, dtype=torch.float64)).to(dtype).double()
    gb64 = torch.randn(N, d, generator=g, dtype=torch.float64).to(dtype).double()
    lb64 = torch.randn(N, generator=g, dtype=torch.float64)
    targets = torch.randint(0, V, (N,), generator=g)
    targets[0], targets[-1] = 0, V - 1
    sample = torch.arange(N) % 3
    rank = torch.div(torch.arange(N), 3, rounding_mode="floor")
    lengths = torch.clamp(torch.bincount(sample, minlength=3) - torch.tensor([0, 2, 5]), min=1)
    row_weights = torch.where(rank < lengths[sample], 1.0 / lengths[sample].double(), 0.0).float()
    row_weights[list(zero_rows)] = 0.0
    dev = torch.device(device)
    return dict(hidden=h64.to(dtype).to(dev), weight=w64.to(dtype).to(dev), targets=targets.to(dev),
                row_weights=row_weights.to(dev), grad_bar=gb64.to(dtype).to(dev), loss_bar=lb64.to(dev),
                h64=h64.to(dev), w64=w64.to(dev), gb64=gb64.to(dev))


def full_logits(hidden, weight, targets, row_weights):
    """The plain formulation: (N, V) logits, cross-entropy and its hidden gradient by autograd (create_graph),
    so the result is differentiable twice. Rows of weight 0: loss 0, gradient 0."""
    active = row_weights != 0
    loss = F.cross_entropy((hidden @ weight.t()).to(torch.promote_types(hidden.dtype, torch.float32)),
                           torch.where(active, targets, 0), reduction="none")
    loss = torch.where(active, loss, 0.0)
    (grad,) = torch.autograd.grad((loss * row_weights).sum(), hidden, create_graph=True)
    return loss, grad


def vjp(fn, hidden, weight, targets, row_weights, loss_bar, grad_bar):
    """Gradients w.r.t. (hidden, weight) of <loss_bar, loss> + <grad_bar, grad> for (loss, grad) = fn(...)."""
    h, w = hidden.detach().requires_grad_(True), weight.detach().requires_grad_(True)
    loss, grad = fn(h, w, targets, row_weights)
    scalar = (loss_bar.to(loss.dtype) * loss).sum() + (grad_bar.to(grad.dtype) * grad).sum()
    return torch.autograd.grad(scalar, (h, w))


def lse_of(x):
    return torch.logsumexp(x["h64"] @ x["w64"].t(), dim=1)


@pytest.fixture
def small_chunks(monkeypatch):
    """The twin's chunks hold 3 rows' worth of columns at most, so every shape here spans several chunks."""
    def use(rows):
        monkeypatch.setattr(op, "_REFERENCE_CHUNK_ELEMENTS", 3 * rows)
    return use


SHAPES = [(37, 97, 24), (5, 11, 7), (1, 13, 4), (21, 64, 33)]  # (N, V, d): V never a multiple of the chunk


@pytest.mark.parametrize("N, V, d", SHAPES)
def test_values_are_the_first_order_op(N, V, d):
    x = make_inputs(N, V, d, torch.float64, seed=N + V)
    loss, grad = head_loss_op(x["hidden"], x["weight"], x["targets"], x["row_weights"])
    loss_ref, grad_ref = fused_head_loss_reference(x["hidden"], x["weight"], x["targets"], x["row_weights"])
    assert torch.equal(loss, loss_ref) and torch.equal(grad, grad_ref)
    x = make_inputs(N, V, d, torch.float32, seed=N + V)
    loss, grad = head_loss_op(x["hidden"], x["weight"], x["targets"], x["row_weights"], backend="reference")
    loss_ref, grad_ref = fused_head_loss_reference(x["hidden"], x["weight"], x["targets"], x["row_weights"])
    assert loss.dtype == torch.float32 and torch.equal(loss, loss_ref) and torch.equal(grad, grad_ref)


@pytest.mark.parametrize("chunked", [False, True])
@pytest.mark.parametrize("N, V, d", SHAPES)
def test_backward_matches_autograd_of_full_logits(N, V, d, chunked, small_chunks):
    if chunked:
        small_chunks(N)
    x = make_inputs(N, V, d, torch.float64, seed=2 * N + V, zero_rows=[N // 2] if N > 2 else ())
    args = (x["hidden"], x["weight"], x["targets"], x["row_weights"].double(), x["loss_bar"], x["grad_bar"])
    want = vjp(full_logits, *args)
    got = vjp(head_loss_op, *args)
    for a, b in zip(got, want):
        assert rel_err(a, b) < 1e-10
    # the twin called directly, with the lse the forward saves and with its own
    for lse in (lse_of(x), None):
        twin = head_loss_double_backward_reference(*args[:4], lse, *args[4:])
        for a, b in zip(twin, want):
            assert rel_err(a, b) < 1e-10


def test_backward_for_one_input_only():
    x = make_inputs(13, 29, 8, torch.float64, seed=5, zero_rows=[3])
    args = (x["targets"], x["row_weights"].double())
    want = vjp(full_logits, x["hidden"], x["weight"], *args, x["loss_bar"], x["grad_bar"])
    for which in (0, 1):
        h = x["hidden"].clone().requires_grad_(which == 0)
        w = x["weight"].clone().requires_grad_(which == 1)
        loss, grad = head_loss_op(h, w, *args)
        (got,) = torch.autograd.grad((x["loss_bar"] * loss).sum() + (x["grad_bar"] * grad).sum(), (h, w)[which])
        assert rel_err(got, want[which]) < 1e-10


@pytest.mark.parametrize("backend", ["reference", pytest.param("kernel", marks=pytest.mark.needs_triton)])
def test_confident_rows_keep_their_digits(backend):
    # p_t close to 1: every dJ/dz is small; p_t - 1 and u_t - u_bar formed as differences in fp32 would lose
    # the digits (relative errors of about 1e-3 here), the sums around the target column keep them
    x = make_inputs(17, 61, 16, torch.float32, seed=7)
    unit = x["w64"][x["targets"]] / x["w64"][x["targets"]].norm(dim=1, keepdim=True)
    h64 = (x["h64"] + 20.0 * unit).float().double()
    loss, _ = fused_head_loss_reference(h64, x["w64"], x["targets"], x["row_weights"].double())
    live = x["row_weights"] != 0
    assert loss[live].min() < 1e-7 and loss[live].max() < 0.03  # the regime this test is about
    args = (x["targets"], x["row_weights"])
    want = head_loss_double_backward_reference(h64, x["w64"], *args, torch.logsumexp(h64 @ x["w64"].t(), dim=1),
                                               x["loss_bar"], x["gb64"])
    got = vjp(lambda *a: head_loss_op(*a, backend=backend), h64.float(), x["weight"], *args, x["loss_bar"],
              x["grad_bar"])
    for a, b in zip(got, want):
        assert rel_err(a, b) < 1e-5


@pytest.mark.parametrize("N, V, d", [(4, 7, 3), (6, 5, 2)])
def test_gradcheck(N, V, d, small_chunks):
    small_chunks(N)
    x = make_inputs(N, V, d, torch.float64, seed=N * V, zero_rows=[1])
    h, w = x["hidden"].clone().requires_grad_(True), x["weight"].clone().requires_grad_(True)
    rw = x["row_weights"].double()
    assert torch.autograd.gradcheck(lambda a, b: head_loss_op(a, b, x["targets"], rw), (h, w))


@pytest.mark.parametrize("N, V, d", [(4, 7, 3), (6, 5, 2)])
def test_gradgradcheck(N, V, d, small_chunks):
    small_chunks(N)
    x = make_inputs(N, V, d, torch.float64, seed=N * V + 1, zero_rows=[2])
    h, w = x["hidden"].clone().requires_grad_(True), x["weight"].clone().requires_grad_(True)
    rw = x["row_weights"].double()
    assert torch.autograd.gradgradcheck(lambda a, b: head_loss_op(a, b, x["targets"], rw), (h, w))


def test_zero_weight_rows_are_constants():
    # NaN hidden rows, out-of-range targets and NaN cotangents on rows of weight 0 reach nothing
    x = make_inputs(12, 23, 6, torch.float64, seed=11, zero_rows=[2, 7])
    clean = vjp(head_loss_op, x["hidden"], x["weight"], x["targets"], x["row_weights"], x["loss_bar"], x["grad_bar"])
    for name, row, value in (("hidden", 2, float("nan")), ("targets", 2, -100), ("targets", 7, 23),
                             ("loss_bar", 7, float("nan")), ("grad_bar", 2, float("nan"))):
        x[name][row] = value
    dirty = vjp(head_loss_op, x["hidden"], x["weight"], x["targets"], x["row_weights"], x["loss_bar"], x["grad_bar"])
    assert torch.equal(dirty[1], clean[1])
    assert torch.equal(dirty[0], clean[0]) and (dirty[0][[2, 7]] == 0).all()


class _Sizes(TorchDispatchMode):
    """Records the number of elements of every tensor an aten op returns."""
    def __init__(self):
        super().__init__()
        self.numels = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.numels.append(t.numel())
        return out


def test_nothing_of_rows_by_vocabulary_is_saved_or_built(small_chunks):
    N, V, d = 37, 97, 24  # d < N: the weight gradient (V, d) is smaller than N x V
    small_chunks(N)
    x = make_inputs(N, V, d, torch.float64, seed=13)
    h, w = x["hidden"].clone().requires_grad_(True), x["weight"].clone().requires_grad_(True)

    def saved_numels(fn):
        numels = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: numels.append(t.numel()) or t, lambda t: t):
            loss, grad = fn(h, w, x["targets"], x["row_weights"])
        return numels, (x["loss_bar"] * loss).sum() + (x["grad_bar"] * grad).sum()

    numels, scalar = saved_numels(head_loss_op)
    assert sorted(numels) == sorted([N * d, V * d, N, N, N])  # hidden, weight, targets, row_weights, lse
    sizes = _Sizes()
    with sizes:
        torch.autograd.grad(scalar, (h, w))
    assert V * d in sizes.numels and max(sizes.numels) < N * V  # the mode saw the backward, nothing N x V
    # what the recompute did before: autograd through the twin saves every chunk's logits
    numels, _ = saved_numels(fused_head_loss_reference)
    assert max(numels) >= N * V


def _composition(head, x, A, W, targets, row_weights, B, T):
    """A small write step in the shape of engine/recompute.py: memory -> hidden (tanh of a linear map), the
    head + loss, the hand-written backward of the map (a graph in x, A, W), an update of the memory."""
    pre = x @ A
    hidden = torch.tanh(pre)
    loss_rows, grad_rows = head(hidden, W, targets, row_weights)
    loss = (loss_rows * row_weights.to(loss_rows.dtype)).view(B, T).sum(dim=1)
    g = (grad_rows * (1 - hidden * hidden)) @ A.t()
    return loss, x - 0.1 * g


@pytest.mark.parametrize("dtype, backend, rtol", [(torch.float64, "auto", 1e-10), (torch.float32, "reference", 1e-5)])
def test_replacing_the_twin_in_a_composition_keeps_second_order_gradients(dtype, backend, rtol):
    B, T, d, V = 3, 5, 8, 29
    x = make_inputs(B * T, V, d, torch.float64, seed=17, zero_rows=[4, 9, 14])
    g = torch.Generator().manual_seed(19)
    leaves = [(0.5 * torch.randn(B * T, d, generator=g, dtype=torch.float64)).to(dtype),
              (torch.randn(d, d, generator=g, dtype=torch.float64) / d ** 0.5).to(dtype), x["weight"].to(dtype)]
    seeds = (torch.randn(B, generator=g, dtype=torch.float64).to(dtype),
             torch.randn(B * T, d, generator=g, dtype=torch.float64).to(dtype))
    row_weights = x["row_weights"].to(dtype) if dtype == torch.float64 else x["row_weights"]
    ops = {"twin": fused_head_loss_reference,
           "op": lambda *a: head_loss_op(*a, backend=backend)}
    found = {}
    for name, head in ops.items():
        inputs = [t.clone().requires_grad_(True) for t in leaves]
        loss, memory = _composition(head, *inputs, x["targets"], row_weights, B, T)
        found[name] = torch.autograd.grad((seeds[0] * loss.to(dtype)).sum() + (seeds[1] * memory).sum(), inputs)
    ref = found["twin"]
    if dtype == torch.float32:  # both against the float64 composition
        inputs = [t.double().requires_grad_(True) for t in leaves]
        loss, memory = _composition(fused_head_loss_reference, *inputs, x["targets"], x["row_weights"].double(), B, T)
        ref = torch.autograd.grad((seeds[0].double() * loss).sum() + (seeds[1].double() * memory).sum(), inputs)
        for a, b in zip(found["twin"], ref):
            assert rel_err(a, b) < rtol
    for a, b in zip(found["op"], ref):
        assert rel_err(a, b) < rtol


def test_backward_without_create_graph_reads_the_saved_lse(monkeypatch):
    x = make_inputs(9, 17, 5, torch.float64, seed=23)
    seen = []
    real = op.head_loss_double_backward_reference
    monkeypatch.setattr(op, "head_loss_double_backward_reference",
                        lambda *a, **k: seen.append(a[4] is not None) or real(*a, **k))
    vjp(head_loss_op, x["hidden"], x["weight"], x["targets"], x["row_weights"], x["loss_bar"], x["grad_bar"])
    assert seen == [True]
    h = x["hidden"].clone().requires_grad_(True)
    loss, _ = head_loss_op(h, x["weight"], x["targets"], x["row_weights"])
    torch.autograd.grad(loss.sum(), h, create_graph=True)
    assert seen == [True, False]  # a differentiable backward recomputes lse in its graph


def test_row_weights_requiring_grad_is_refused():
    x = make_inputs(5, 11, 4, torch.float64, seed=29)
    with pytest.raises(ValueError, match="row_weights requires grad"):
        head_loss_op(x["hidden"], x["weight"], x["targets"], x["row_weights"].double().requires_grad_(True))


def _bad_op_calls():
    h, w, t, rw = torch.randn(5, 8), torch.randn(11, 8), torch.tensor([0, 1, 2, 10, 4]), torch.ones(5)
    yield "backend", (h, w, t, rw), dict(backend="fast")
    yield "hidden", (h[None], w, t, rw), {}
    yield "weight", (h, torch.randn(11, 9), t, rw), {}
    yield "weight dtype", (h, w.half(), t, rw), {}
    yield "targets", (h, w, t.int(), rw), {}
    yield r"targets\[3\] = 11", (h, w, torch.tensor([0, 1, 2, 11, 4]), rw), {}
    yield "row_weights", (h, w, t, rw.half()), {}


@pytest.mark.parametrize("match, args, kwargs", list(_bad_op_calls()))
def test_bad_op_arguments(match, args, kwargs):
    with pytest.raises(ValueError, match=match):
        head_loss_op(*args, **kwargs)


def _bad_backward_calls():
    h, w, t, rw = torch.randn(5, 8), torch.randn(11, 8), torch.tensor([0, 1, 2, 10, 4]), torch.ones(5)
    lse, lb, gb = torch.zeros(5), torch.zeros(5), torch.zeros(5, 8)
    yield "lse", (h, w, t, rw, torch.zeros(4), lb, gb)
    yield "lse", (h, w, t, rw, lse.double(), lb, gb)
    yield "lse must be a tensor", (h, w, t, rw, [0.0] * 5, lb, gb)
    yield "loss_bar", (h, w, t, rw, lse, torch.zeros(5, 1), gb)
    yield "grad_bar", (h, w, t, rw, lse, lb, gb.half())
    yield "grad_bar", (h, w, t, rw, lse, lb, gb.t())
    yield "grad_bar is on meta", (h, w, t, rw, lse, lb, gb.to("meta"))
    yield r"targets\[1\] = -1", (h, w, torch.tensor([0, -1, 2, 3, 4]), rw, lse, lb, gb)


@pytest.mark.parametrize("match, args", list(_bad_backward_calls()))
def test_bad_backward_arguments(match, args):
    with pytest.raises(ValueError, match=match):
        head_loss_double_backward(*args)


def test_float64_takes_the_twin_and_kernel_refuses_it():
    x = make_inputs(7, 13, 4, torch.float64, seed=31)
    args = (x["hidden"], x["weight"], x["targets"], x["row_weights"], lse_of(x), x["loss_bar"], x["grad_bar"])
    got = head_loss_double_backward(*args)
    want = head_loss_double_backward_reference(*args)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    with pytest.raises(RuntimeError, match="float64"):
        head_loss_double_backward(*args, backend="kernel")
    with pytest.raises(RuntimeError, match="float64"):
        head_loss_op(*args[:4], backend="kernel")
