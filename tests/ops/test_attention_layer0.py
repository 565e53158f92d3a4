"""Layer-0 reuse path: context state once per write, memory-only step; equal to full attention over
[memory; context] with lengths m + L_b (float64 autograd and the kernel full path)."""
import math

import pytest
import torch

from helpers import poison_, rel_err
from gradmem_fast.ops import attention as A
from test_attention import (
    SCALE, _gpu_plain, _gpu_truth, err, float64_truth, make_qkv, naive_attention, plain_torch_errors,
)

pytestmark = pytest.mark.needs_triton  # every kernel test here launches Triton (interpreter or GPU)


def split(q, k, v, m):
    return q[:, :m], k[:, :m], v[:, :m], q[:, m:], k[:, m:], v[:, m:]


def layer0_path(q, k, v, m, ctx_lengths, do, backend, out=None):
    qm, km, vm, qc, kc, vc = split(q, k, v, m)
    state = A.context_attention_state(qc, kc, vc, ctx_lengths, SCALE, backend=backend)
    o, lse = A.memory_attention_forward(qm, km, vm, qc, state, ctx_lengths, SCALE, backend=backend,
                                        out=None if out is None else out[:2])
    grads = A.memory_attention_backward(do, qm, km, vm, qc, o, lse, ctx_lengths, SCALE, backend=backend,
                                        out=None if out is None else out[2:])
    return o, lse, grads


def state_float64(qc, kc, vc, ctx_lengths):
    """acc, row_max, row_sum from an explicit masked float64 softmax."""
    B, T, Hq, D = qc.shape
    kv_head = torch.arange(Hq) // (Hq // kc.shape[2])
    acc = torch.zeros(B, T, Hq, D, dtype=torch.float64)
    row_max = torch.zeros(B, Hq, T, dtype=torch.float64)
    row_sum = torch.zeros(B, Hq, T, dtype=torch.float64)
    for b in range(B):
        n = int(ctx_lengths[b])
        if n == 0:
            continue
        s = qc[b, :n].double().transpose(0, 1) @ kc[b, :n][:, kv_head].double().permute(1, 2, 0) * SCALE
        s = s.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), -math.inf)
        mx = s.amax(-1)
        e = torch.exp(s - mx[..., None])
        acc[b, :n] = (e @ vc[b, :n][:, kv_head].double().transpose(0, 1)).transpose(0, 1)
        row_max[b, :, :n] = mx
        row_sum[b, :, :n] = e.sum(-1)
    return acc, row_max, row_sum


CASES = [  # B, m, T, Hq, Hkv, D, ctx_lengths
    (3, 8, 29, 4, 2, 32, [29, 1, 0]),
    (2, 1, 36, 4, 1, 64, [36, 17]),
    (2, 32, 20, 4, 2, 32, [5, 20]),
    (2, 17, 83, 4, 4, 32, [83, 40]),
    (2, 5, 18, 2, 1, 256, [18, 7]),  # the largest head dim (Gemma 3)
]


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 2e-6)])
@pytest.mark.parametrize("B, m, T, Hq, Hkv, D, ctx_lengths", CASES)
def test_layer0_kernel_matches_full_attention(B, m, T, Hq, Hkv, D, ctx_lengths, dtype, tol):
    q, k, v = make_qkv(B, m + T, Hq, Hkv, D, dtype, seed=m + T)
    lc = torch.tensor(ctx_lengths, dtype=torch.int32)
    lens = lc + m
    do = torch.randn(B, m + T, Hq, D, generator=torch.Generator().manual_seed(1)).to(dtype)
    out = (poison_(torch.empty(B, m + T, Hq, D, dtype=dtype)), poison_(torch.empty(B, Hq, m + T)),
           poison_(torch.empty(B, m, Hq, D, dtype=dtype)), poison_(torch.empty(B, m, Hkv, D, dtype=dtype)),
           poison_(torch.empty(B, m, Hkv, D, dtype=dtype)))
    o, lse, (dq, dk, dv) = layer0_path(q, k, v, m, lc, do, "kernel", out=out)
    truth = float64_truth(q, k, v, lens, do)
    for name, x, ref in zip(("o", "lse", "dq_mem", "dk_mem", "dv_mem"), (o, lse, dq, dk, dv),
                            (truth[0], truth[1], truth[2][:, :m], truth[3][:, :m], truth[4][:, :m])):
        assert err(x, ref) < tol, f"{name}: {err(x, ref):.3g}"
    for b, n in enumerate(lens.tolist()):
        assert torch.all(o[b, n:] == 0) and torch.all(lse[b, :, n:] == 0)
    # the kernel full path on the same inputs
    o_full, lse_full = A.attention_forward(q, k, v, lens, SCALE, backend="kernel")
    full = A.attention_backward(do, q, k, v, o_full, lse_full, lens, SCALE, backend="kernel")
    for name, x, ref in zip(("o", "lse", "dq_mem", "dk_mem", "dv_mem"), (o, lse, dq, dk, dv),
                            (o_full, lse_full, *(g[:, :m] for g in full))):
        assert err(x, ref) < tol, f"{name} vs full path: {err(x, ref):.3g}"


@pytest.mark.parametrize("B, m, T, Hq, Hkv, D, ctx_lengths", CASES[:2])
def test_context_state_kernel_against_float64(B, m, T, Hq, Hkv, D, ctx_lengths):
    _, _, _, qc, kc, vc = split(*make_qkv(B, m + T, Hq, Hkv, D, torch.float32, seed=3), m)
    lc = torch.tensor(ctx_lengths, dtype=torch.int32)
    out = tuple(poison_(t) for t in (torch.empty(B, T, Hq, D), torch.empty(B, Hq, T), torch.empty(B, Hq, T)))
    state = A.context_attention_state(qc, kc, vc, lc, SCALE, out=out, backend="kernel")
    assert isinstance(state, A.ContextState) and state.acc.data_ptr() == out[0].data_ptr()
    for name, x, ref in zip(("acc", "row_max", "row_sum"), state, state_float64(qc, kc, vc, lc)):
        assert err(x, ref) < 2e-6, f"{name}: {err(x, ref):.3g}"


@pytest.mark.parametrize("dtype, factor", [(torch.float16, 2.0)])
@pytest.mark.parametrize("B, m, T, Hq, Hkv, D, ctx_lengths", [(2, 16, 45, 4, 2, 64, [45, 1]),
                                                            (2, 5, 18, 2, 1, 256, [7, 18])])
def test_layer0_kernel_fp16(B, m, T, Hq, Hkv, D, ctx_lengths, dtype, factor):
    q, k, v = make_qkv(B, m + T, Hq, Hkv, D, dtype, seed=21)
    lc = torch.tensor(ctx_lengths, dtype=torch.int32)
    do = torch.randn(B, m + T, Hq, D, generator=torch.Generator().manual_seed(2)).to(dtype)
    o, lse, grads = layer0_path(q, k, v, m, lc, do, "kernel")
    truth = float64_truth(q, k, v, lc + m, do)
    full_plain = plain_torch_errors(q, k, v, lc + m, do, truth)
    e_o = rel_err(o, truth[0])
    assert e_o <= factor * full_plain[0], f"o: {e_o:.3g} vs plain fp16 {full_plain[0]:.3g}"
    assert rel_err(lse, truth[1]) < 1e-6
    # the memory rows' gradients against the plain fp16 full computation, restricted to memory rows
    qs, ks, vs = (t.detach().clone().requires_grad_() for t in (q, k, v))
    o16, _ = naive_attention(qs, ks, vs, lc + m, SCALE)
    plain_grads = torch.autograd.grad(o16, (qs, ks, vs), do)
    for name, x, p, ref in zip(("dq_mem", "dk_mem", "dv_mem"), grads, plain_grads, truth[2:]):
        e, base = rel_err(x, ref[:, :m]), rel_err(p[:, :m], ref[:, :m])
        assert e <= factor * base, f"{name}: {e:.3g} vs plain fp16 {base:.3g}"


@pytest.mark.parametrize("B, m, T, Hq, Hkv, D, ctx_lengths", CASES + [(2, 3, 0, 2, 1, 16, [0, 0])])
def test_layer0_twins_match_full_twins(B, m, T, Hq, Hkv, D, ctx_lengths):
    q, k, v = make_qkv(B, m + T, Hq, Hkv, D, torch.float64, seed=m)
    lc = torch.tensor(ctx_lengths, dtype=torch.int32)
    do = torch.randn(B, m + T, Hq, D, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    o, lse, grads = layer0_path(q, k, v, m, lc, do, "reference")
    truth = float64_truth(q, k, v, lc + m, do)
    assert rel_err(o, truth[0]) < 1e-6 and rel_err(lse, truth[1]) < 1e-6  # the state is float32
    for name, x, ref in zip(("dq_mem", "dk_mem", "dv_mem"), grads, truth[2:]):
        assert err(x, ref[:, :m]) < 1e-6, name


def _args():
    q, k, v = make_qkv(2, 9, 4, 2, 16, torch.float32)
    qm, km, vm, qc, kc, vc = split(q, k, v, 4)
    lc = torch.tensor([5, 2], dtype=torch.int32)
    state = A.context_attention_state(qc, kc, vc, lc, SCALE, backend="reference")
    o, lse = A.memory_attention_forward(qm, km, vm, qc, state, lc, SCALE, backend="reference")
    return dict(qm=qm, km=km, vm=vm, qc=qc, kc=kc, vc=vc, lc=lc, state=state, o=o, lse=lse, do=o.clone())


BAD = [  # (arguments replaced, expected message)
    (lambda a: dict(qc=a["qc"][:, :, :2]), "q_ctx shape"),
    (lambda a: dict(qc=a["qc"].half()), "q_ctx is torch.float16"),
    (lambda a: dict(qm=a["qm"][:, :0], km=a["km"][:, :0], vm=a["vm"][:, :0]), "at least one memory row"),
    (lambda a: dict(lc=a["lc"].long()), "ctx_lengths must be int32"),
    (lambda a: dict(state=a["state"]._replace(row_max=a["state"].row_max[:, :, :3])), "state.row_max"),
    (lambda a: dict(state=(a["state"].acc,)), "state must be a ContextState"),
    (lambda a: dict(km=a["km"].double()), "k_mem dtype"),
]


@pytest.mark.parametrize("make, match", BAD)
def test_memory_forward_validation(make, match):
    a = _args()
    a.update(make(a))
    with pytest.raises(ValueError, match=match):
        A.memory_attention_forward(a["qm"], a["km"], a["vm"], a["qc"], a["state"], a["lc"], SCALE)


def test_memory_backward_and_state_validation():
    a = _args()
    with pytest.raises(ValueError, match="do"):
        A.memory_attention_backward(a["do"][:, :5], a["qm"], a["km"], a["vm"], a["qc"], a["o"], a["lse"],
                                    a["lc"], SCALE)
    with pytest.raises(ValueError, match="lse"):
        A.memory_attention_backward(a["do"], a["qm"], a["km"], a["vm"], a["qc"], a["o"], a["lse"].half(),
                                    a["lc"], SCALE)
    with pytest.raises(ValueError, match="scale"):
        A.memory_attention_backward(a["do"], a["qm"], a["km"], a["vm"], a["qc"], a["o"], a["lse"], a["lc"], 0.0)
    with pytest.raises(ValueError, match="k_ctx"):
        A.context_attention_state(a["qc"], a["kc"][:, :3], a["vc"][:, :3], a["lc"], SCALE)
    with pytest.raises(ValueError, match=r"ctx_lengths must have shape \(2,\)"):
        A.context_attention_state(a["qc"], a["kc"], a["vc"], a["lc"][:1], SCALE)


# ---------------------------------------------------------------- GPU only


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, factor", [(torch.bfloat16, 2.0), (torch.float16, 2.0)])
@pytest.mark.parametrize("m, Hq, Hkv, D", [(16, 12, 12, 64), (8, 32, 8, 64), (32, 4, 4, 128)])
def test_gpu_layer0_within_factor_of_plain_torch(dtype, factor, m, Hq, Hkv, D):
    check_gpu_layer0(dtype, factor, m, Hq, Hkv, D)


@pytest.mark.gpu
def test_gpu_layer0_bf16_head_dim_256(monkeypatch):
    """Gemma 3's head dim on the default tiles (GRADMEM_FAST_AUTOTUNE=0: one compile per kernel)."""
    monkeypatch.setenv("GRADMEM_FAST_AUTOTUNE", "0")
    check_gpu_layer0(torch.bfloat16, 2.0, 16, 8, 4, 256)


def check_gpu_layer0(dtype, factor, m, Hq, Hkv, D):
    B, T = 2, 1008
    q, k, v = make_qkv(B, m + T, Hq, Hkv, D, dtype, device="cuda", seed=5)
    lc = torch.tensor([T, 333], dtype=torch.int32, device="cuda")
    do = torch.randn(B, m + T, Hq, D, generator=torch.Generator().manual_seed(6)).to("cuda", dtype)
    o, lse, grads = layer0_path(q, k, v, m, lc, do, "kernel")
    o64, lse64, grads64 = _gpu_truth(q, k, v, lc + m, do)
    plain = _gpu_plain(q, k, v, lc + m, do)
    for name, x, ref, p in zip(("o", "dq_mem", "dk_mem", "dv_mem"), (o, *grads), (o64, *grads64), plain):
        rows = x.shape[1]
        e, base = rel_err(x, ref[:, :rows]), rel_err(p[:, :rows], ref[:, :rows])
        assert e <= factor * base, f"{name}: {e:.3g} vs plain {base:.3g}"
    assert rel_err(lse, lse64) < 1e-5
