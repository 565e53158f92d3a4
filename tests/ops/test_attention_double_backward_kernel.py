"""The Triton kernels of attention's double backward against the float64 twin: fp32 and fp16 under the
interpreter at tiny shapes (GQA, head dims that are not a power of two, ragged lengths with empty samples,
poisoned padding), bf16 and real sizes on a GPU; the op end to end with its kernels; the backend choice."""
import math

import pytest
import torch

import gradmem_fast.kernels.attention_double_backward as kernels  # imported while the interpreter is on
from gradmem_fast.ops.attention import attention_forward_reference
from gradmem_fast.ops.attention_double_backward import (attention_backward_op, attention_double_backward_reference,
                                                         attention_op, attention_op_backward_reference,
                                                         attention_op_with_state)
import helpers
from helpers import rel_err

pytestmark = pytest.mark.needs_triton  # every test here launches Triton (interpreter or GPU)

# (B, S, Hq, Hkv, D, lengths): one full sample; GQA with a ragged and an empty sample and a head dim the
# tiles pad (48 -> 64); MHA over several 16-row blocks with a length inside a block
SHAPES = [(1, 5, 2, 2, 32, [5]), (3, 33, 4, 2, 48, [33, 0, 17]), (2, 37, 3, 3, 16, [37, 21])]


def make_inputs(B, S, Hq, Hkv, D, lengths, dtype, seed, device="cpu"):
    """Inputs in `dtype` and their float64 copies (the same values), with lengths (B,) int32."""
    g = torch.Generator().manual_seed(seed)
    x = {}
    for name, heads in (("q", Hq), ("k", Hkv), ("v", Hkv), ("do", Hq), ("gq", Hq), ("gk", Hkv), ("gv", Hkv)):
        t = torch.randn(B, S, heads, D, generator=g).to(device=device, dtype=dtype)
        x[name], x[name + "64"] = t, t.double()
    x["lengths"] = torch.tensor(lengths, dtype=torch.int32, device=device)
    x["scale"] = 1 / math.sqrt(D)
    return x


def float64_twin(x):
    return attention_double_backward_reference(*(x[n + "64"] for n in ("q", "k", "v", "do")), x["lengths"],
                                               x["scale"], *(x[n + "64"] for n in ("gq", "gk", "gv")))


def launch(x, blocks=None):
    """The host launcher, with o and lse from the float64 forward (the first-order forward's outputs)."""
    o, lse = attention_forward_reference(x["q64"], x["k64"], x["v64"], x["lengths"], x["scale"])
    return kernels.attention_double_backward(x["q"], x["k"], x["v"], x["do"], o.to(x["q"].dtype), lse.float(),
                                             x["lengths"], x["scale"], x["gq"], x["gk"], x["gv"], blocks=blocks)


def plain_torch(x):
    """The unfused computation in the inputs' dtype, as an eager attention runs it (scores and P @ V in the
    dtype, softmax in fp32), differentiated twice by autograd."""
    q, k, v, do = (x[n].detach().requires_grad_(True) for n in ("q", "k", "v", "do"))
    group = q.shape[2] // k.shape[2]
    qh = q.transpose(1, 2)
    kh, vh = (t.repeat_interleave(group, 2).transpose(1, 2) for t in (k, v))
    S = q.shape[1]
    pos = torch.arange(S, device=q.device)
    valid = (pos[None, :] <= pos[:, None])[None, None] & (pos < x["lengths"][:, None])[:, None, None, :]
    scores = (qh @ kh.transpose(-1, -2)) * x["scale"]
    p = torch.softmax(scores.float().masked_fill(~valid, -math.inf), -1).nan_to_num(0.0).to(q.dtype)
    o = (p @ vh).transpose(1, 2) * (pos < x["lengths"][:, None])[:, :, None, None]
    dq, dk, dv = torch.autograd.grad(o, (q, k, v), do, create_graph=True)
    total = sum((x[g].float() * d.float()).sum() for g, d in (("gq", dq), ("gk", dk), ("gv", dv)))
    return torch.autograd.grad(total, (q, k, v, do))


def assert_accuracy(got, want, x, rtol, ratio):
    helpers.assert_accuracy(got, want, x["q"].dtype, rtol, ratio, lambda: plain_torch(x))


ACCURACY = [(torch.float32, 1e-5, None), (torch.float16, None, 2.0)]


@pytest.mark.parametrize("dtype, rtol, ratio", ACCURACY)
@pytest.mark.parametrize("shape", SHAPES)
def test_kernels_match_float64(shape, dtype, rtol, ratio):
    x = make_inputs(*shape, dtype, seed=sum(shape[:5]))
    assert_accuracy(launch(x), float64_twin(x), x, rtol, ratio)


@pytest.mark.parametrize("blocks", [(16, 32), (32, 16)])
def test_tile_shapes_agree(blocks):
    # BLOCK_M != BLOCK_N: the key side's first query block and the causal diagonal cut across tiles
    x = make_inputs(2, 45, 4, 2, 16, [45, 30], torch.float32, seed=5)
    for a, b in zip(launch(x, blocks), float64_twin(x)):
        assert rel_err(a, b) < 1e-5


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy sees the NaN rows
def test_padding_rows_are_ignored_and_get_zero():
    x = make_inputs(3, 33, 4, 2, 48, [33, 0, 17], torch.float32, seed=7)
    want = float64_twin(x)
    for name in ("q", "k", "v", "do", "gq", "gk", "gv"):
        x[name][1:, 17:] = math.nan  # rows beyond each length: never read
    got = launch(x)
    for a, b in zip(got, want):
        assert torch.equal(a[1:, 17:], torch.zeros_like(a[1:, 17:]))
        assert rel_err(a, b) < 1e-5


def test_strided_inputs():
    # q, k, v as head slices of one packed (B, S, Hq + 2 Hkv, D) projection, as the engine's views are
    x = make_inputs(2, 21, 4, 2, 16, [21, 9], torch.float32, seed=11)
    want = float64_twin(x)
    packed = torch.cat([x["q"], x["k"], x["v"]], dim=2)
    x["q"], x["k"], x["v"] = packed[:, :, :4], packed[:, :, 4:6], packed[:, :, 6:]
    assert not x["q"].is_contiguous()
    for a, b in zip(launch(x), want):
        assert rel_err(a, b) < 1e-5


def second_order(x, backend, create_graph=False):
    """Cotangents of q, k, v, do of <gq, dq> + <gk, dk> + <gv, dv>, through attention_op's autograd."""
    q, k, v, do = (x[n].detach().requires_grad_(True) for n in ("q", "k", "v", "do"))
    o = attention_op(q, k, v, x["lengths"], x["scale"], backend=backend)
    grads = torch.autograd.grad(o, (q, k, v), do, create_graph=True)
    total = sum((x[g] * d).sum() for g, d in zip(("gq", "gk", "gv"), grads))
    return torch.autograd.grad(total, (q, k, v, do), create_graph=create_graph)


@pytest.mark.parametrize("dtype, rtol, ratio", ACCURACY)
def test_op_end_to_end_with_its_kernels(monkeypatch, dtype, rtol, ratio):
    calls = []
    run = kernels.attention_double_backward
    monkeypatch.setattr(kernels, "attention_double_backward", lambda *a, **kw: calls.append(1) or run(*a, **kw))
    x = make_inputs(3, 33, 4, 2, 48, [33, 0, 17], dtype, seed=13)
    got = second_order(x, "kernel")
    assert len(calls) == 1
    assert_accuracy(got, float64_twin(x), x, rtol, ratio)


def test_auto_takes_the_kernels_and_reference_the_twins(monkeypatch):
    x = make_inputs(2, 21, 4, 2, 16, [21, 9], torch.float32, seed=17)
    by_kernel = second_order(x, "kernel")
    assert all(torch.equal(a, b) for a, b in zip(second_order(x, "auto"), by_kernel))
    calls = []
    monkeypatch.setattr(kernels, "attention_double_backward", lambda *a, **kw: calls.append(1))
    by_twin = second_order(x, "reference")
    assert not calls
    for a, b in zip(by_twin, float64_twin(x)):
        assert rel_err(a, b) < 1e-5


def test_third_order_runs_on_the_twin():
    # under create_graph the double backward is itself differentiated: the twin's autograd graph
    x = make_inputs(1, 9, 2, 1, 16, [9], torch.float32, seed=19)
    got = second_order(x, "kernel", create_graph=True)
    assert got[0].requires_grad
    for a, b in zip(got, float64_twin(x)):
        assert rel_err(a.detach(), b) < 1e-5


def test_first_order_of_the_op_is_the_kernel_backward():
    x = make_inputs(2, 21, 4, 2, 16, [21, 9], torch.float32, seed=23)
    q, k, v = (x[n].detach().requires_grad_(True) for n in ("q", "k", "v"))
    o = attention_op(q, k, v, x["lengths"], x["scale"], backend="kernel")
    got = torch.autograd.grad(o, (q, k, v), x["do"])
    want = attention_op_backward_reference(*(x[n + "64"] for n in ("q", "k", "v", "do")), x["lengths"], x["scale"])
    for a, b in zip(got, want):
        assert rel_err(a, b) < 1e-5


def test_strided_lengths():
    # a column of a (B, 2) tensor: the kernels read lengths with stride 1, so the op hands them a copy
    x = make_inputs(2, 21, 4, 2, 16, [21, 9], torch.float32, seed=37)
    x["lengths"] = torch.tensor([[21, 1], [9, 2]], dtype=torch.int32)[:, 0]
    assert x["lengths"].stride() == (2,)
    for a, b in zip(second_order(x, "kernel"), float64_twin(x)):
        assert rel_err(a, b) < 1e-5


def test_backward_op_reuses_the_forward_state(monkeypatch):
    import gradmem_fast.kernels.attention as first_order

    x = make_inputs(2, 21, 4, 2, 16, [21, 9], torch.float32, seed=41)
    q, k, v = (x[n].detach().requires_grad_(True) for n in ("q", "k", "v"))
    o, state = attention_op_with_state(q, k, v, x["lengths"], x["scale"], backend="kernel")
    assert state is not None and torch.equal(state[0], o.detach())
    forwards = []
    run = first_order.attention_forward
    monkeypatch.setattr(first_order, "attention_forward", lambda *a, **kw: forwards.append(1) or run(*a, **kw))
    with_state = attention_backward_op(q, k, v, x["do"], x["lengths"], x["scale"], state=state, backend="kernel")
    assert not forwards
    without = attention_backward_op(q, k, v, x["do"], x["lengths"], x["scale"], backend="kernel")
    assert len(forwards) == 1
    assert all(torch.equal(a, b) for a, b in zip(with_state, without))
    assert attention_op_with_state(q, k, v, x["lengths"], x["scale"], backend="reference")[1] is None


def test_dispatch_without_interpreter(monkeypatch):
    x = make_inputs(1, 9, 2, 1, 16, [9], torch.float32, seed=29)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        attention_op(x["q"], x["k"], x["v"], x["lengths"], x["scale"], backend="kernel")
    got = second_order(x, "auto")  # the twin, by design on the CPU
    for a, b in zip(got, float64_twin(x)):
        assert rel_err(a, b) < 1e-5


def test_unsupported_inputs_and_bad_backend():
    x = make_inputs(1, 9, 2, 1, 16, [9], torch.float64, seed=31)
    with pytest.raises(RuntimeError, match="float64"):
        attention_op(x["q"], x["k"], x["v"], x["lengths"], x["scale"], backend="kernel")
    with pytest.raises(ValueError, match="backend"):
        attention_op(x["q"], x["k"], x["v"], x["lengths"], x["scale"], backend="triton")
    with pytest.raises(ValueError, match="k is torch.float32"):
        attention_op(x["q"], x["k"].float(), x["v"], x["lengths"], x["scale"])
    with pytest.raises(ValueError, match="lengths is on meta"):
        attention_op(x["q"], x["k"], x["v"], x["lengths"].to("meta"), x["scale"])


# GPT-2's heads (the meta-gpt2 case), Llama-style GQA at head dim 128, Gemma 3's 256: (dtype, shape)
GPU_CASES = [(torch.float32, (2, 512, 12, 12, 64, [512, 300])), (torch.bfloat16, (2, 512, 12, 12, 64, [512, 300])),
             (torch.bfloat16, (2, 384, 8, 2, 128, [384, 129])), (torch.float16, (2, 384, 8, 2, 128, [384, 129])),
             (torch.bfloat16, (1, 256, 4, 2, 256, [256])), (torch.float32, (2, 113 + 8, 4, 4, 32, [121, 60]))]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, shape", GPU_CASES)
def test_gpu_kernels_match_float64(dtype, shape):
    rtol, ratio = (1e-5, None) if dtype == torch.float32 else (None, 2.0)
    fp32 = torch.backends.cuda.matmul.fp32_precision
    torch.backends.cuda.matmul.fp32_precision = "ieee"  # fp32 dots in true fp32
    try:
        x = make_inputs(*shape, dtype, seed=sum(shape[:5]), device="cuda")
        got = launch(x)
        assert_accuracy(got, float64_twin(x), x, rtol, ratio)
        assert_accuracy(second_order(x, "kernel"), float64_twin(x), x, rtol, ratio)
    finally:
        torch.backends.cuda.matmul.fp32_precision = fp32
