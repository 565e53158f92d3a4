"""Runs the standard cases: each writer timed, its peak memory measured, its result checked."""
import datetime
import os
import statistics
import time

import torch

from ..api import write
from . import cases as cases_mod
from .floor import floor_ms, measure_matmul_tflops
from .plain_loop import compile_model, plain_write
from .profile import profile_call

# Cases whose compiled loop a quick run keeps: the ones with a compiled-loop target.
QUICK_COMPILE = ("gpt2-latency", "llama1b-latency")
GB = 1e9
BACKEND_ENV = "GRADMEM_FAST_BACKEND"


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _elapsed_ms(fn, device):
    if torch.device(device).type == "cuda":
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def time_write(fn, device, warmup, repeats):
    """(median ms over `repeats` calls after `warmup` calls, seconds the first call took)."""
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    first_s = time.perf_counter() - start
    for _ in range(max(warmup - 1, 0)):
        fn()
    _sync(device)
    return statistics.median(_elapsed_ms(fn, device) for _ in range(repeats)), first_s


def peak_gb(fn, device):
    """torch.cuda.max_memory_allocated over one call, in GB (1e9 bytes); None off CUDA."""
    if torch.device(device).type != "cuda":
        return None
    _sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    _sync(device)
    return torch.cuda.max_memory_allocated(device) / GB


def rel_err(x, ref):
    """max |x - ref| / max |ref| in float64; inf when x is not finite."""
    x = x.detach().double()
    ref = ref.detach().double().expand_as(x)
    if not torch.isfinite(x).all():
        return float("inf")
    return ((x - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def _measure(name, fn, device, warmup, repeats, entry):
    """Fill entry[name_ms], entry[name_peak_gb] (or a reason); return the writer's output."""
    holder = {}

    def call():
        holder["out"] = fn()

    try:
        ms, first_s = time_write(call, device, warmup, repeats)
        entry[f"{name}_ms"] = ms
        entry[f"{name}_first_call_s"] = first_s
        entry[f"{name}_peak_gb"] = peak_gb(call, device)
        entry[f"{name}_reason"] = None
    except Exception as exc:  # a writer that cannot run is a result, not a crash
        entry[f"{name}_ms"] = None
        entry[f"{name}_peak_gb"] = None
        entry[f"{name}_reason"] = f"{type(exc).__name__}: {exc}"
        holder.pop("out", None)
    return holder.get("out")


def run_case(case, device, *, warmup, repeats, compiled, matmul_tflops, profile=False, seed=0):
    """One case: plain loop, compiled loop (when `compiled`), reference and fast writers; with `profile`,
    entry["fast_profile"] summarises one more fast write under torch.profiler (see profile.py)."""
    model = cases_mod.build_model(case, device, seed=seed)
    ids, memory = cases_mod.make_inputs(case, device, seed=seed)
    K, lr = case.K, cases_mod.LR
    entry = {"case": case.name, "B": case.B, "T": case.T, "m": case.m, "K": K, "dtype": case.dtype,
             "lr": lr}
    config = model.config
    entry["floor_ms"] = floor_ms(config, case.B, case.T, case.m, K, matmul_tflops)

    outputs = {}
    outputs["plain"] = _measure(
        "plain", lambda: plain_write(model, memory, ids, steps=K, lr=lr), device, warmup, repeats, entry)
    if compiled and torch.device(device).type == "cuda":
        forward = compile_model(model)
        outputs["compiled"] = _measure(
            "compiled", lambda: plain_write(model, memory, ids, steps=K, lr=lr, forward=forward),
            device, max(warmup, 3), repeats, entry)  # compile, then cudagraph-tree warm-up and record
        entry["compiled_compile_s"] = entry.pop("compiled_first_call_s", None)
        del forward
        torch._dynamo.reset()
    else:
        entry["compiled_ms"] = None
        entry["compiled_peak_gb"] = None
        entry["compiled_reason"] = ("not requested (--compile)" if torch.device(device).type == "cuda"
                                    else "needs CUDA (reduce-overhead mode records CUDA graphs)")
    for backend in ("reference", "fast"):  # "fast" raises BackendUnavailable with its reasons
        outputs[backend] = _measure(
            backend, lambda: write(model, memory, ids, steps=K, lr=lr, backend=backend),
            device, warmup, repeats, entry)

    _ratios(entry, outputs)
    if profile and entry["fast_ms"] is not None:
        try:
            entry["fast_profile"] = profile_call(
                lambda: write(model, memory, ids, steps=K, lr=lr, backend="fast"), device)
        except Exception as exc:  # the profile is extra information; its failure must not lose the case
            entry["fast_profile"] = {"error": f"{type(exc).__name__}: {exc}"}
    del model, outputs
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
    return entry


def _ratios(entry, outputs):
    fast = outputs.get("fast")
    against = "reference" if outputs.get("reference") is not None else "plain"
    entry["fast_rel_err"] = None if fast is None or outputs.get(against) is None else rel_err(fast, outputs[against])
    entry["fast_rel_err_against"] = against if entry["fast_rel_err"] is not None else None
    if outputs.get("reference") is not None and outputs.get("plain") is not None:
        entry["reference_rel_err_vs_plain"] = rel_err(outputs["reference"], outputs["plain"])

    def ratio(a, b):
        return None if a is None or b is None or b == 0 else a / b

    entry["fast_over_floor"] = ratio(entry["fast_ms"], entry["floor_ms"])
    entry["plain_over_fast"] = ratio(entry["plain_ms"], entry["fast_ms"])
    entry["compiled_over_fast"] = ratio(entry["compiled_ms"], entry["fast_ms"])
    entry["plain_over_floor"] = ratio(entry["plain_ms"], entry["floor_ms"])
    entry["fast_peak_over_plain"] = ratio(entry["fast_peak_gb"], entry["plain_peak_gb"])


def environment(device, matmul_tflops):
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    import transformers

    is_cuda = torch.device(device).type == "cuda"
    return {
        "card": torch.cuda.get_device_name(device) if is_cuda else "cpu",
        "device": str(device),
        "torch": torch.__version__,
        "triton": triton_version,
        "transformers": transformers.__version__,
        "date": datetime.date.today().isoformat(),
        "matmul_tflops": matmul_tflops,
    }


def run(case_list, device="cuda", *, warmup=2, repeats=5, compile_cases=(), gpu_tests=None,
        profile=False, on_case=None, log=print, meta_case_list=()):
    """The benchmark result (see benchmarks/results/README.md); `on_case(result)` after each case.
    meta_case_list: meta-step cases (meta_cases.py), run after the write cases into result["meta_cases"]."""
    is_cuda = torch.device(device).type == "cuda"
    notes = []
    if is_cuda:
        matmul_tflops = measure_matmul_tflops(device)
        log(f"bf16 8192^3 matmul: {matmul_tflops:.1f} TFLOP/s")
    else:
        matmul_tflops = None
        notes.append("CPU run: matmul rate not measured, so floor_ms is null; peak memory is not measured")
    result = environment(device, matmul_tflops)
    result.update({"warmup": warmup, "repeats": repeats, "notes": notes, "cases": [], "meta_cases": [],
                   "gpu_tests": gpu_tests})
    # The library's backend override would make "reference" and "fast" time the same writer.
    forced = os.environ.pop(BACKEND_ENV, None)
    if forced is not None:
        notes.append(f"{BACKEND_ENV}={forced} was ignored for this run")
    try:
        for case in case_list:
            log(f"case {case.name}: B={case.B} T={case.T} m={case.m} K={case.K} {case.dtype}")
            entry = run_case(case, device, warmup=warmup, repeats=repeats,
                             compiled=case.name in compile_cases, matmul_tflops=matmul_tflops,
                             profile=profile)
            result["cases"].append(entry)
            if on_case is not None:
                on_case(result)
        if meta_case_list:
            from .meta_cases import run_meta_case

        for case in meta_case_list:
            log(f"meta case {case.name}: B={case.B} T={case.T} m={case.m} K={case.K} {case.dtype}")
            result["meta_cases"].append(run_meta_case(case, device, warmup=warmup, repeats=repeats))
            if on_case is not None:
                on_case(result)
    finally:
        if forced is not None:
            os.environ[BACKEND_ENV] = forced
    return result
