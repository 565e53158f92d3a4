"""One whole K-step write per standard latency case: the fast writer against the plain loop.

    pytest benchmarks/bench_write.py --benchmark-columns=median,min,max

extra_info per case: the FLOP floor (ms) from the same session's bf16 matmul rate, and the write's
peak memory (GB). The whole-table run with ratios is `python -m gradmem_fast bench`.
"""
import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)

import gradmem_fast  # noqa: E402
from gradmem_fast.benchmark import cases  # noqa: E402
from gradmem_fast.benchmark.floor import floor_ms  # noqa: E402
from gradmem_fast.benchmark.plain_loop import plain_write  # noqa: E402
from gradmem_fast.benchmark.runner import peak_gb  # noqa: E402

LATENCY = [c.name for c in cases.CASES if c.latency]
ROUNDS = dict(rounds=10, warmup_rounds=2, iterations=1)


@pytest.fixture(scope="module", params=LATENCY)
def setup(request):
    case = cases.get_case(request.param)
    model = cases.build_model(case, "cuda")
    ids, memory = cases.make_inputs(case, "cuda")
    yield case, model, ids, memory
    del model
    torch.cuda.empty_cache()


@pytest.mark.parametrize("writer", ["plain", "fast"])
def test_write(benchmark, setup, writer, cuda_sync, matmul_tflops):
    case, model, ids, memory = setup
    if writer == "plain":
        def write():
            return plain_write(model, memory, ids, steps=case.K, lr=cases.LR)
    else:
        def write():
            return gradmem_fast.write(model, memory, ids, steps=case.K, lr=cases.LR, backend="fast")
        try:
            write()
        except gradmem_fast.BackendUnavailable as exc:
            pytest.skip(str(exc))

    def timed():
        write()
        cuda_sync()

    benchmark.group = case.name
    benchmark.extra_info["floor_ms"] = floor_ms(model.config, case.B, case.T, case.m, case.K, matmul_tflops)
    benchmark.extra_info["peak_gb"] = peak_gb(write, "cuda")
    benchmark.pedantic(timed, **ROUNDS)
