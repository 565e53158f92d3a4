"""Fused per-token csrc ops vs a device-to-device copy of the same bytes and vs torch.compile of
the op's PyTorch twin, bf16, at the standard batch shapes.

    pytest benchmarks/bench_fused_ops.py --benchmark-columns=median,min,max

Shapes: GPT-2 batch 16*1024 rows x 768 (LayerNorm with bias, GELU tanh over 3072), Llama-1B batch
8*2064 rows x 2048 (RMSNorm, SwiGLU over 8192, rotary on q: 32 heads x 64), memory (8, 16, 2048).
extra_info: gbps (bytes read + written once / median time) and bytes; the "copy" rows move the
same number of bytes with Tensor.copy_, the bandwidth the ops should approach.
"""
import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)

from gradmem_fast.ops import activation, add_norm, memory_update, rotary  # noqa: E402

DT = torch.bfloat16
ROUNDS = dict(rounds=30, warmup_rounds=5, iterations=1)
GPT2 = dict(rows=16 * 1024, d=768, ffn=3072)
LLAMA = dict(rows=8 * 2064, d=2048, ffn=8192, B=8, S=2064, H=32, hd=64)


def _r(*shape, dtype=DT):
    return torch.randn(*shape, device="cuda", dtype=torch.float32).to(dtype)


def _cases():
    """name -> (make() -> (csrc_fn, twin_fn, twin_args), bytes moved)."""
    e = 2  # bf16 bytes
    cases = {}
    for model, cfg, kind, bias in (("gpt2", GPT2, "layer", True), ("llama1b", LLAMA, "rms", False)):
        rows, d, ffn = cfg["rows"], cfg["d"], cfg["ffn"]

        def norm_fwd(rows=rows, d=d, kind=kind, bias=bias):
            x, r, w = _r(rows, d), _r(rows, d), _r(d)
            b = _r(d) if bias else None
            return (lambda: add_norm.add_norm_forward(x, r, w, b, 1e-5, kind, backend="kernel"),
                    add_norm.add_norm_forward_reference, (x, r, w, b, 1e-5, kind))

        def norm_bwd(rows=rows, d=d, kind=kind):
            x, dy, dres, w = _r(rows, d), _r(rows, d), _r(rows, d), _r(d)
            _, h, stats = add_norm.add_norm_forward(x, None, w, None, 1e-5, kind)
            return (lambda: add_norm.add_norm_backward(dy, dres, h, w, stats, kind, backend="kernel"),
                    add_norm.add_norm_backward_reference, (dy, dres, h, w, stats, kind))

        cases[f"add_norm_fwd-{model}"] = (norm_fwd, 4 * rows * d * e + rows * 8)
        cases[f"add_norm_bwd-{model}"] = (norm_bwd, 4 * rows * d * e + rows * 8)
        if model == "gpt2":
            def gelu_fwd(n=rows * ffn):
                x = _r(n)
                return (lambda: activation.gelu_forward(x, "tanh", backend="kernel"),
                        activation.gelu_forward_reference, (x, "tanh"))

            def gelu_bwd(n=rows * ffn):
                x, dy = _r(n), _r(n)
                return (lambda: activation.gelu_backward(dy, x, "tanh", backend="kernel"),
                        activation.gelu_backward_reference, (dy, x, "tanh"))

            cases["gelu_fwd-gpt2"] = (gelu_fwd, 2 * rows * ffn * e)
            cases["gelu_bwd-gpt2"] = (gelu_bwd, 3 * rows * ffn * e)
        else:
            def swiglu_fwd(n=rows * ffn):
                g, u = _r(n), _r(n)
                return (lambda: activation.swiglu_forward(g, u, backend="kernel"),
                        activation.swiglu_forward_reference, (g, u))

            def swiglu_bwd(n=rows * ffn):
                dy, g, u = _r(n), _r(n), _r(n)
                return (lambda: activation.swiglu_backward(dy, g, u, backend="kernel"),
                        activation.swiglu_backward_reference, (dy, g, u))

            B, S, H, hd = cfg["B"], cfg["S"], cfg["H"], cfg["hd"]

            def rope():
                q = _r(B, S, H, hd)
                inv = 1.0 / (10000.0 ** (torch.arange(0, hd, 2, device="cuda", dtype=torch.float32) / hd))
                cos, sin = rotary.rotary_tables(inv, torch.arange(S, device="cuda"), 1.0)

                def twin(q, cos, sin):
                    return rotary.apply_rotary__reference(q, cos, sin, rotary_dim=hd)

                return (lambda: rotary.apply_rotary_(q, cos, sin, rotary_dim=hd, backend="kernel"),
                        twin, (q, cos, sin))

            cases["swiglu_fwd-llama1b"] = (swiglu_fwd, 3 * rows * ffn * e)
            cases["swiglu_bwd-llama1b"] = (swiglu_bwd, 5 * rows * ffn * e)
            cases["apply_rotary-llama1b"] = (rope, 2 * B * S * H * hd * e)

    def mem_update():
        m, g, lr = _r(8, 16, 2048, dtype=torch.float32), _r(8, 16, 2048), torch.tensor(0.1, device="cuda")

        def twin(m, g, lr):
            return memory_update.memory_update__reference(m, g, lr, clip_norm=1.0)

        return (lambda: memory_update.memory_update_(m, g, lr, clip_norm=1.0, backend="kernel"), twin, (m, g, lr))

    cases["memory_update-llama1b"] = (mem_update, 8 * 16 * 2048 * (4 + 4 + 2))
    return cases


CASES = _cases()


@pytest.mark.parametrize("impl", ["csrc", "torch_compile", "copy"])
@pytest.mark.parametrize("case", list(CASES))
def test_fused_op(benchmark, cuda_sync, case, impl):
    make, nbytes = CASES[case]
    if impl == "copy":
        src = torch.empty(nbytes // 2, dtype=torch.uint8, device="cuda")
        dst = torch.empty_like(src)

        def fn():
            dst.copy_(src)
    elif impl == "csrc":
        fn = make()[0]
    else:
        _, twin, args = make()
        compiled = torch.compile(twin)
        compiled(*args)

        def fn():
            compiled(*args)

    def timed():
        fn()
        cuda_sync()

    timed()
    benchmark.pedantic(timed, **ROUNDS)
    seconds = benchmark.stats.stats.median
    benchmark.extra_info.update(bytes=nbytes, gbps=nbytes / seconds / 1e9, impl=impl, case=case,
                                device=torch.cuda.get_device_name())
