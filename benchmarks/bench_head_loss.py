"""Fused LM head + cross-entropy vs the plain torch path, at the GPT-2 and Llama-1B head shapes.

    pytest benchmarks/bench_head_loss.py --benchmark-columns=median,min,max

extra_info per case: peak memory above the inputs and outputs (MiB), achieved TFLOP/s (counting the
two head GEMMs, 4 N V d), and the same run's bf16 matmul rate (8192^3) for the ratio.
"""
import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)

from gradmem_fast.kernels.head_loss import head_loss  # noqa: E402

N = 16384
HEADS = {"gpt2": (768, 50257), "llama1b": (2048, 128256)}
IMPLS = ("torch", "chunked", "fused")
ROUNDS = dict(rounds=10, warmup_rounds=2, iterations=1)


def _inputs(d, V, dtype=torch.bfloat16, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    hidden = torch.randn(N, d, device="cuda", dtype=dtype, generator=g)
    weight = (0.02 * torch.randn(V, d, device="cuda", generator=g)).to(dtype)
    targets = torch.randint(0, V, (N,), device="cuda", generator=g)
    row_weights = torch.full((N,), 1.0 / 1024, device="cuda")
    row_weights[::64] = 0.0  # some rows that predict nothing, as in a ragged batch
    return hidden, weight, targets, row_weights


def _call(impl, hidden, weight, targets, row_weights):
    loss = torch.empty(N, dtype=torch.float32, device="cuda")
    grad = torch.empty_like(hidden)
    if impl == "torch":
        h = hidden.detach().requires_grad_(True)

        def run():
            ce = F.cross_entropy((h @ weight.t()).float(), targets, reduction="none")
            (g,) = torch.autograd.grad((ce * row_weights).sum(), h)
            torch.cuda.synchronize()
            return ce, g
    else:
        def run():
            head_loss(hidden, weight, targets, row_weights, loss, grad, method=impl)
            torch.cuda.synchronize()
            return loss, grad
    return run


def _peak_extra_mib(run):
    run()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    run()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


_matmul_rate = {}


def _bf16_matmul_tflops():
    if "rate" not in _matmul_rate:
        a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
        b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
        for _ in range(3):
            a @ b
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        times = []
        for _ in range(10):
            start.record()
            a @ b
            stop.record()
            stop.synchronize()
            times.append(start.elapsed_time(stop) / 1e3)
        _matmul_rate["rate"] = 2 * 8192**3 / sorted(times)[len(times) // 2] / 1e12
    return _matmul_rate["rate"]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("head", list(HEADS))
def test_head_loss(benchmark, head, impl):
    d, V = HEADS[head]
    inputs = _inputs(d, V)
    run = _call(impl, *inputs)
    benchmark.group = f"head_loss-{head}"
    benchmark.extra_info["card"] = torch.cuda.get_device_name()
    benchmark.extra_info["peak_extra_MiB"] = round(_peak_extra_mib(run), 1)
    benchmark.pedantic(run, **ROUNDS)
    if benchmark.stats is None:  # --benchmark-disable
        return
    tflops = 4 * N * V * d / benchmark.stats.stats.median / 1e12
    benchmark.extra_info["TFLOP/s"] = round(tflops, 1)
    benchmark.extra_info["bf16_matmul_TFLOP/s"] = round(_bf16_matmul_tflops(), 1)
    benchmark.extra_info["fraction_of_matmul_rate"] = round(tflops / _bf16_matmul_tflops(), 3)
