"""Causal ragged GQA attention: Triton kernels (interpreter on CPU) and the PyTorch twins against a
float64 softmax attention and its autograd gradients."""
import math

import pytest
import torch

from helpers import poison_, rel_err
from gradmem_fast.engine.launches import LaunchCounter
from gradmem_fast.ops import attention as A

pytestmark = pytest.mark.needs_triton  # every kernel test here launches Triton (interpreter or GPU)


def err(x, ref):
    """rel_err, or the largest absolute value where the exact result is identically zero (dq when
    every valid row sees a single key)."""
    if ref.abs().max() == 0:
        return x.double().abs().max().item() if torch.isfinite(x).all() else math.inf
    return rel_err(x, ref)

SCALE = 0.3


def make_qkv(B, S, Hq, Hkv, D, dtype, device="cpu", seed=0):
    """q, k, v as strided views of one fused projection output (B, S, Hq + 2 Hkv, D)."""
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(B, S, Hq + 2 * Hkv, D, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    return qkv[:, :, :Hq], qkv[:, :, Hq:Hq + Hkv], qkv[:, :, Hq + Hkv:]


def naive_attention(q, k, v, lengths, scale):
    """o (B, S, Hq, D) and lse (B, Hq, S), one sample at a time, in q's dtype; padded rows 0."""
    B, S, Hq, D = q.shape
    kv_head = torch.arange(Hq) // (Hq // k.shape[2])
    outs, lses = [], []
    for b in range(B):
        n = int(lengths[b])
        qb = q[b, :n].transpose(0, 1)  # (Hq, n, D)
        kb = k[b, :n][:, kv_head].transpose(0, 1)
        vb = v[b, :n][:, kv_head].transpose(0, 1)
        s = (qb @ kb.transpose(1, 2)) * scale
        s = s.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), -math.inf)
        ob = (torch.softmax(s, -1) @ vb).transpose(0, 1)
        outs.append(torch.cat([ob, q.new_zeros(S - n, Hq, D)]))
        lses.append(torch.cat([torch.logsumexp(s, -1).detach(), q.new_zeros(Hq, S - n)], dim=1))
    return torch.stack(outs), torch.stack(lses)


def float64_truth(q, k, v, lengths, do, scale=SCALE):
    """o, lse, dq, dk, dv in float64 by autograd through the naive attention."""
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    o, lse = naive_attention(q64, k64, v64, lengths, scale)
    dq, dk, dv = torch.autograd.grad(o, (q64, k64, v64), do.double())
    return o.detach(), lse, dq, dk, dv


def plain_torch_errors(q, k, v, lengths, do, truth, scale=SCALE):
    """Errors of the same naive attention run in q's dtype (the plain PyTorch computation)."""
    qs, ks, vs = (t.detach().clone().requires_grad_() for t in (q, k, v))
    o, _ = naive_attention(qs, ks, vs, lengths, scale)
    grads = torch.autograd.grad(o, (qs, ks, vs), do)
    return [rel_err(x, ref) for x, ref in zip((o, *grads), (truth[0], *truth[2:]))]


CASES = [  # B, S, Hq, Hkv, D, lengths
    (2, 1, 4, 2, 32, [1, 1]),
    (3, 37, 4, 2, 32, [37, 1, 20]),
    (2, 100, 4, 1, 64, [100, 57]),
    (2, 21, 2, 1, 256, [21, 9]),  # the largest head dim (Gemma 3)
]
FP16_CASES = [
    (3, 37, 4, 2, 64, [37, 1, 29]),
    (2, 100, 4, 1, 32, [63, 100]),
    (2, 21, 2, 1, 256, [12, 21]),
]


def _check_padding(o, lse, dq, dk, dv, lengths):
    for b, n in enumerate(lengths):
        for name, t in (("o", o[b, n:]), ("dq", dq[b, n:]), ("dk", dk[b, n:]), ("dv", dv[b, n:]),
                        ("lse", lse[b, :, n:])):
            assert torch.all(t == 0), f"{name} of padded rows of sample {b} not zero"


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 2e-6)])
@pytest.mark.parametrize("B, S, Hq, Hkv, D, lengths", CASES)
def test_kernel_fp32_against_float64(B, S, Hq, Hkv, D, lengths, dtype, tol):
    q, k, v = make_qkv(B, S, Hq, Hkv, D, dtype, seed=S)
    lens = torch.tensor(lengths, dtype=torch.int32)
    do = torch.randn(B, S, Hq, D, generator=torch.Generator().manual_seed(1)).to(dtype)
    out = (poison_(torch.empty(B, S, Hq, D, dtype=dtype)), poison_(torch.empty(B, Hq, S)))
    o, lse = A.attention_forward(q, k, v, lens, SCALE, out=out, backend="kernel")
    assert o.data_ptr() == out[0].data_ptr() and lse.data_ptr() == out[1].data_ptr()
    grads = tuple(poison_(torch.empty_like(t, memory_format=torch.contiguous_format)) for t in (q, k, v))
    dq, dk, dv = A.attention_backward(do, q, k, v, o, lse, lens, SCALE, out=grads, backend="kernel")
    truth = float64_truth(q, k, v, lens, do)
    for name, x, ref in zip(("o", "lse", "dq", "dk", "dv"), (o, lse, dq, dk, dv), truth):
        assert err(x, ref) < tol, f"{name}: {err(x, ref):.3g}"
    _check_padding(o, lse, dq, dk, dv, lengths)


@pytest.mark.parametrize("dtype, factor", [(torch.float16, 2.0)])
@pytest.mark.parametrize("B, S, Hq, Hkv, D, lengths", FP16_CASES)
def test_kernel_fp16_within_factor_of_plain_torch(B, S, Hq, Hkv, D, lengths, dtype, factor):
    q, k, v = make_qkv(B, S, Hq, Hkv, D, dtype, seed=S + 1)
    lens = torch.tensor(lengths, dtype=torch.int32)
    do = torch.randn(B, S, Hq, D, generator=torch.Generator().manual_seed(2)).to(dtype)
    o, lse = A.attention_forward(q, k, v, lens, SCALE, backend="kernel")
    dq, dk, dv = A.attention_backward(do, q, k, v, o, lse, lens, SCALE, backend="kernel")
    truth = float64_truth(q, k, v, lens, do)
    plain = plain_torch_errors(q, k, v, lens, do, truth)
    for name, x, ref, base in zip(("o", "dq", "dk", "dv"), (o, dq, dk, dv), (truth[0], *truth[2:]), plain):
        e = rel_err(x, ref)
        assert e <= factor * base, f"{name}: {e:.3g} vs plain fp16 {base:.3g}"
    assert rel_err(lse, truth[1]) < 1e-6
    _check_padding(o, lse, dq, dk, dv, lengths)


@pytest.mark.parametrize("blocks", [(32, 16), (16, 32)])
def test_kernel_unequal_blocks(blocks):
    """BLOCK_M != BLOCK_N (the GPU configurations) with ragged lengths and a zero-length sample."""
    from gradmem_fast.kernels import attention as K

    B, S, Hq, Hkv, D = 3, 37, 4, 2, 32
    lengths = [37, 0, 18]
    q, k, v = make_qkv(B, S, Hq, Hkv, D, torch.float32, seed=7)
    lens = torch.tensor(lengths, dtype=torch.int32)
    do = torch.randn(B, S, Hq, D, generator=torch.Generator().manual_seed(3))
    o, lse = K.attention_forward(q, k, v, lens, SCALE, blocks=blocks)
    dq, dk, dv = K.attention_backward(do, q, k, v, o, lse, lens, SCALE, blocks=blocks)
    truth = float64_truth(q, k, v, lens, do)
    for name, x, ref in zip(("o", "lse", "dq", "dk", "dv"), (o, lse, dq, dk, dv), truth):
        assert err(x, ref) < 2e-6, f"{name}: {err(x, ref):.3g}"
    _check_padding(o, lse, dq, dk, dv, lengths)


@pytest.mark.parametrize("backend, tol", [("kernel", 2e-6), ("reference", 2e-6)])
def test_write_attention_gradients(backend, tol):
    B, S, Hq, Hkv, D = 2, 37, 4, 2, 32
    lens = torch.tensor([30, 37], dtype=torch.int32)
    q, k, v = (t.detach().clone().requires_grad_() for t in make_qkv(B, S, Hq, Hkv, D, torch.float32, seed=11))
    do = torch.randn(B, S, Hq, D, generator=torch.Generator().manual_seed(4))
    o = A.write_attention(q, k, v, lens, SCALE, backend=backend)
    grads = torch.autograd.grad(o, (q, k, v), do)
    truth = float64_truth(q, k, v, lens, do)
    for name, x, ref in zip(("o", "dq", "dk", "dv"), (o, *grads), (truth[0], *truth[2:])):
        assert err(x, ref) < tol, f"{name}: {err(x, ref):.3g}"


@pytest.mark.parametrize("B, S, Hq, Hkv, D, lengths", CASES + [(2, 37, 4, 4, 48, [0, 5])])
def test_reference_twins_against_float64(B, S, Hq, Hkv, D, lengths):
    q, k, v = make_qkv(B, S, Hq, Hkv, D, torch.float64, seed=S + 5)
    lens = torch.tensor(lengths, dtype=torch.int32)
    do = torch.randn(B, S, Hq, D, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    o, lse = A.attention_forward(q, k, v, lens, SCALE, backend="reference")
    grads = A.attention_backward(do, q, k, v, o, lse, lens, SCALE, backend="reference")
    truth = float64_truth(q, k, v, lens, do)
    assert rel_err(o, truth[0]) < 1e-12 and rel_err(lse, truth[1]) < 1e-6
    for name, x, ref in zip(("dq", "dk", "dv"), grads, truth[2:]):
        assert err(x, ref) < 1e-6, name  # lse is float32
    _check_padding(o, lse, *grads, lengths)


def test_auto_falls_back_for_float64():
    q, k, v = make_qkv(1, 5, 2, 1, 16, torch.float64)
    lens = torch.tensor([5], dtype=torch.int32)
    with pytest.warns(UserWarning, match="float64"):
        A.attention_forward(q, k, v, lens, SCALE, backend="auto")
    with pytest.raises(RuntimeError, match="float64"):
        A.attention_forward(q, k, v, lens, SCALE, backend="kernel")


def _good():
    q, k, v = make_qkv(2, 5, 4, 2, 16, torch.float32)
    return dict(q=q, k=k, v=v, lengths=torch.tensor([5, 3], dtype=torch.int32), scale=SCALE)


BAD = [  # (arguments replaced, expected message)
    (lambda a: dict(q=a["q"][0]), "q must be 4-d"),
    (lambda a: dict(k=a["k"][:, :4], v=a["v"][:, :4]), "does not match"),
    (lambda a: dict(k=a["k"][:, :, :1]), "differs from v shape"),
    (lambda a: dict(v=a["v"].double()), "dtype"),
    (lambda a: dict(k=torch.randn(2, 5, 3, 16), v=torch.randn(2, 5, 3, 16)), "multiple of kv heads"),
    (lambda a: dict(lengths=a["lengths"].long()), "lengths must be int32"),
    (lambda a: dict(lengths=a["lengths"][:1]), r"lengths must have shape \(2,\)"),
    (lambda a: dict(lengths=torch.tensor([[5, 0], [3, 0]], dtype=torch.int32)[:, 0]), "lengths must be contiguous"),
    (lambda a: dict(scale=float("nan")), "scale"),
    (lambda a: dict(scale=-1.0), "scale"),
    (lambda a: dict(q=a["q"].to(torch.int32)), "floating point"),
]


@pytest.mark.parametrize("make, match", BAD)
def test_forward_validation(make, match):
    args = _good()
    args.update(make(args))
    with pytest.raises(ValueError, match=match):
        A.attention_forward(args["q"], args["k"], args["v"], args["lengths"], args["scale"])
    with pytest.raises(ValueError, match=match):
        A.write_attention(args["q"], args["k"], args["v"], args["lengths"], args["scale"])


def test_backward_and_out_validation():
    a = _good()
    o, lse = A.attention_forward(a["q"], a["k"], a["v"], a["lengths"], SCALE, backend="reference")
    with pytest.raises(ValueError, match="lse"):
        A.attention_backward(o, a["q"], a["k"], a["v"], o, lse[:, :, :4], a["lengths"], SCALE)
    with pytest.raises(ValueError, match="do"):
        A.attention_backward(o[:, :4], a["q"], a["k"], a["v"], o, lse, a["lengths"], SCALE)
    with pytest.raises(ValueError, match=r"out\[1\]"):
        A.attention_forward(a["q"], a["k"], a["v"], a["lengths"], SCALE, out=(o, lse.double()))
    with pytest.raises(ValueError, match="backend"):
        A.attention_forward(a["q"], a["k"], a["v"], a["lengths"], SCALE, backend="fast")


class _LaunchOrder(LaunchCounter):
    """LaunchCounter that also keeps the (kind, name) of each launch in order."""

    def __init__(self):
        super().__init__()
        self.order = []

    def record(self, kind, name):
        super().record(kind, name)
        self.order.append((kind, name))


def test_backward_launches_dq_then_dkdv_and_nothing_else():
    """The full backward is two kernels: dQ (which writes delta) first, then dK/dV (which reads it);
    no preprocess kernel and no torch launch."""
    from gradmem_fast.kernels import attention as K

    B, S, Hq, Hkv, D = 2, 37, 4, 2, 32
    q, k, v = make_qkv(B, S, Hq, Hkv, D, torch.float32, seed=13)
    lens = torch.tensor([37, 5], dtype=torch.int32)
    do = torch.randn(B, S, Hq, D, generator=torch.Generator().manual_seed(6))
    o, lse = K.attention_forward(q, k, v, lens, SCALE)
    grads = K.attention_backward(do, q, k, v, o, lse, lens, SCALE)  # autotuning (GPU) before counting
    with _LaunchOrder() as counter:
        K.attention_backward(do, q, k, v, o, lse, lens, SCALE, out=grads)
    assert counter.order == [("triton", "_bwd_dq_kernel"), ("triton", "_bwd_dkdv_kernel")]


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-6), (torch.float16, 1e-6)])
@pytest.mark.parametrize("split", [False, True])
def test_dq_kernel_writes_delta(monkeypatch, dtype, tol, split):
    """delta (B, Hq, S) from the dQ kernel against float64 rowsum(dO * O), exactly 0 on padded rows; with
    `split` the batch runs in pieces (grid limit lowered to 5: one sample of 4 heads per launch)."""
    from gradmem_fast.kernels import attention as K, attention_common

    if split:
        monkeypatch.setattr(attention_common, "MAX_GRID_Y", 5)
    B, S, Hq, Hkv, D = 3, 37, 4, 2, 48
    lengths = [37, 0, 18]
    q, k, v = make_qkv(B, S, Hq, Hkv, D, dtype, seed=17)
    lens = torch.tensor(lengths, dtype=torch.int32)
    g = torch.Generator().manual_seed(8)
    do = torch.randn(B, S, Hq, D, generator=g).to(dtype)
    o = torch.randn(B, S, Hq, D, generator=g).to(dtype)  # any o: delta depends on it only through the sum
    lse = torch.randn(B, Hq, S, generator=g)
    delta = poison_(torch.empty(B, Hq, S))
    dq = poison_(torch.empty(B, S, Hq, D, dtype=dtype))
    K.launch_dq(q, k, v, do, lse, delta, dq, lens, 0, SCALE, o=o)
    valid = (torch.arange(S)[None, :] < lens[:, None].long())[:, None, :]
    truth = torch.where(valid, (do.double() * o.double()).sum(-1).transpose(1, 2), 0.0)
    assert torch.isfinite(delta).all() and torch.isfinite(dq).all()
    assert rel_err(delta, truth) < tol
    assert torch.all(delta[~valid.expand_as(delta)] == 0)
    for b, n in enumerate(lengths):
        assert torch.all(dq[b, n:] == 0)


# ---------------------------------------------------------------- GPU only


def _gpu_case(dtype, B=2, S=1029, Hq=8, Hkv=2, D=64, lengths=(1029, 517), seed=0):
    q, k, v = make_qkv(B, S, Hq, Hkv, D, dtype, device="cuda", seed=seed)
    lens = torch.tensor(lengths, dtype=torch.int32, device="cuda")
    do = torch.randn(B, S, Hq, D, generator=torch.Generator().manual_seed(9)).to("cuda", dtype)
    return q, k, v, lens, do


def _gpu_truth(q, k, v, lens, do):
    """float64 attention on the GPU with a dense mask (autograd)."""
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    o, lse = A.attention_forward_reference(q64, k64, v64, lens, SCALE)
    grads = torch.autograd.grad(o, (q64, k64, v64), do.double())
    return o, lse, grads


def _gpu_plain(q, k, v, lens, do):
    qs, ks, vs = (t.detach().clone().requires_grad_() for t in (q, k, v))
    group = q.shape[2] // k.shape[2]
    qh, kh, vh = qs.transpose(1, 2), ks.transpose(1, 2).repeat_interleave(group, 1), vs.transpose(1, 2).repeat_interleave(group, 1)
    S = q.shape[1]
    i = torch.arange(S, device=q.device)
    mask = (i[None, :] <= i[:, None])[None, None] & (i[None, None, None, :] < lens[:, None, None, None].long())
    s = (qh @ kh.transpose(-1, -2) * SCALE).masked_fill(~mask, -math.inf)
    p = torch.softmax(s, -1).nan_to_num(0.0)
    o = (p @ vh).transpose(1, 2)
    row_ok = (i[None, :] < lens[:, None].long())[:, :, None, None]
    o = o * row_ok
    return (o, *torch.autograd.grad(o, (qs, ks, vs), do))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, factor", [(torch.bfloat16, 2.0), (torch.float16, 2.0)])
@pytest.mark.parametrize("Hq, Hkv, D", [(8, 2, 64), (4, 4, 128), (4, 1, 32)])
def test_gpu_16bit_within_factor_of_plain_torch(dtype, factor, Hq, Hkv, D):
    check_gpu_16bit(dtype, factor, Hq, Hkv, D)


@pytest.mark.gpu
def test_gpu_bf16_head_dim_256(monkeypatch):
    """Gemma 3's head dim on the default tiles (GRADMEM_FAST_AUTOTUNE=0: one compile per kernel)."""
    monkeypatch.setenv("GRADMEM_FAST_AUTOTUNE", "0")
    check_gpu_16bit(torch.bfloat16, 2.0, 8, 4, 256)


def check_gpu_16bit(dtype, factor, Hq, Hkv, D):
    q, k, v, lens, do = _gpu_case(dtype, Hq=Hq, Hkv=Hkv, D=D)
    o, lse = A.attention_forward(q, k, v, lens, SCALE, backend="kernel")
    grads = A.attention_backward(do, q, k, v, o, lse, lens, SCALE, backend="kernel")
    o64, lse64, grads64 = _gpu_truth(q, k, v, lens, do)
    plain = _gpu_plain(q, k, v, lens, do)
    for name, x, ref, p in zip(("o", "dq", "dk", "dv"), (o, *grads), (o64, *grads64), plain):
        e, base = rel_err(x, ref), rel_err(p, ref)
        assert e <= factor * base, f"{name}: {e:.3g} vs plain {base:.3g}"
    assert rel_err(lse, lse64) < 1e-5


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5)])
def test_gpu_fp32(dtype, tol):
    q, k, v, lens, do = _gpu_case(dtype, S=300, lengths=(300, 1), D=128)
    o, lse = A.attention_forward(q, k, v, lens, SCALE, backend="kernel")
    grads = A.attention_backward(do, q, k, v, o, lse, lens, SCALE, backend="kernel")
    o64, lse64, grads64 = _gpu_truth(q, k, v, lens, do)
    for name, x, ref in zip(("o", "lse", "dq", "dk", "dv"), (o, lse, *grads), (o64, lse64, *grads64)):
        assert err(x, ref) < tol, f"{name}: {err(x, ref):.3g}"


@pytest.mark.gpu
def test_gpu_cuda_graph_capture():
    """Forward and backward into fixed buffers replay in a CUDA graph (no host synchronisation)."""
    q, k, v, lens, do = _gpu_case(torch.bfloat16, S=257, lengths=(200, 257))
    o, lse = A.attention_forward(q, k, v, lens, SCALE, backend="kernel")  # autotune before capture
    grads = A.attention_backward(do, q, k, v, o, lse, lens, SCALE, backend="kernel")
    ref = [t.clone() for t in (o, lse, *grads)]
    for t in (o, lse, *grads):
        t.fill_(float("nan"))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        A.attention_forward(q, k, v, lens, SCALE, out=(o, lse), backend="kernel", validate=False)
        A.attention_backward(do, q, k, v, o, lse, lens, SCALE, out=grads, backend="kernel", validate=False)
    graph.replay()
    torch.cuda.synchronize()
    for x, r in zip((o, lse, *grads), ref):
        assert torch.equal(x, r)
