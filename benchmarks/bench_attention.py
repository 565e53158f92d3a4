"""Attention forward + input-gradient backward vs torch SDPA, and the layer-0 per-step path vs full
attention. bf16, CUDA only. Run: pytest benchmarks/bench_attention.py --benchmark-only"""
import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)

from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

from gradmem_fast.ops import attention as A  # noqa: E402

SHAPES = {  # B, S, Hq, Hkv, D
    "gpt2": (16, 1024, 12, 12, 64),
    "llama1b": (8, 2064, 32, 8, 64),
}
SDPA_BACKENDS = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
}
DTYPE = torch.bfloat16


def _inputs(B, S, Hq, Hkv, D, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    qkv = torch.randn(B, S, Hq + 2 * Hkv, D, device="cuda", dtype=DTYPE, generator=g)
    q, k, v = qkv[:, :, :Hq], qkv[:, :, Hq:Hq + Hkv], qkv[:, :, Hq + Hkv:]
    do = torch.randn(B, S, Hq, D, device="cuda", dtype=DTYPE, generator=g)
    return q, k, v, do


def _timed(benchmark, fn):
    for _ in range(3):  # autotune and warm up outside the timing
        fn()
    torch.cuda.synchronize()

    def call():
        fn()
        torch.cuda.synchronize()

    benchmark.pedantic(call, rounds=20, iterations=5, warmup_rounds=2)


@pytest.mark.parametrize("shape", list(SHAPES))
def test_gradmem_attention_fwd_bwd(benchmark, shape):
    B, S, Hq, Hkv, D = SHAPES[shape]
    q, k, v, do = _inputs(B, S, Hq, Hkv, D)
    lengths = torch.full((B,), S, dtype=torch.int32, device="cuda")
    scale = D ** -0.5
    o = torch.empty(B, S, Hq, D, device="cuda", dtype=DTYPE)
    lse = torch.empty(B, Hq, S, device="cuda", dtype=torch.float32)
    grads = (torch.empty_like(o), torch.empty(B, S, Hkv, D, device="cuda", dtype=DTYPE),
             torch.empty(B, S, Hkv, D, device="cuda", dtype=DTYPE))

    def fn():
        A.attention_forward(q, k, v, lengths, scale, out=(o, lse), backend="kernel", validate=False)
        A.attention_backward(do, q, k, v, o, lse, lengths, scale, out=grads, backend="kernel", validate=False)

    _timed(benchmark, fn)


@pytest.mark.parametrize("sdpa_backend", list(SDPA_BACKENDS))
@pytest.mark.parametrize("shape", list(SHAPES))
def test_sdpa_fwd_bwd(benchmark, shape, sdpa_backend):
    B, S, Hq, Hkv, D = SHAPES[shape]
    q, k, v, do = _inputs(B, S, Hq, Hkv, D)
    # SDPA takes (B, H, S, D); the bshd views transpose for free
    qh, kh, vh = (t.transpose(1, 2).detach().requires_grad_() for t in (q, k, v))
    doh = do.transpose(1, 2)

    def fn():
        with sdpa_kernel(SDPA_BACKENDS[sdpa_backend]):
            out = torch.nn.functional.scaled_dot_product_attention(qh, kh, vh, is_causal=True,
                                                                   enable_gqa=Hq != Hkv)
        torch.autograd.grad(out, (qh, kh, vh), doh)

    try:
        fn()
    except RuntimeError as exc:
        pytest.skip(f"SDPA {sdpa_backend} cannot run this shape: {str(exc).splitlines()[0]}")
    _timed(benchmark, fn)


@pytest.mark.parametrize("path", ["layer0_step", "full"])
def test_layer0_step_vs_full(benchmark, path):
    """One write step's layer-0 attention at S = 1024, m = 16 (GPT-2 shape): the memory-only
    forward + backward against full attention forward + backward."""
    B, _, Hq, Hkv, D = SHAPES["gpt2"]
    m, T = 16, 1008
    q, k, v, do = _inputs(B, m + T, Hq, Hkv, D)
    ctx_lengths = torch.full((B,), T, dtype=torch.int32, device="cuda")
    scale = D ** -0.5
    if path == "full":
        lengths = ctx_lengths + m

        def fn():
            o, lse = A.attention_forward(q, k, v, lengths, scale, backend="kernel", validate=False)
            A.attention_backward(do, q, k, v, o, lse, lengths, scale, backend="kernel", validate=False)
    else:
        qm, km, vm, qc = q[:, :m], k[:, :m], v[:, :m], q[:, m:]
        state = A.context_attention_state(qc, k[:, m:], v[:, m:], ctx_lengths, scale, backend="kernel")

        def fn():
            o, lse = A.memory_attention_forward(qm, km, vm, qc, state, ctx_lengths, scale, backend="kernel",
                                                validate=False)
            A.memory_attention_backward(do, qm, km, vm, qc, o, lse, ctx_lengths, scale, backend="kernel",
                                        validate=False)
    _timed(benchmark, fn)
