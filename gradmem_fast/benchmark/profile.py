"""Where a write's time goes: one call under torch.profiler, summarised per kernel.

On CUDA the summary counts device work (kernels, memcpy, memset; CUDA-graph replays included, as
CUPTI reports each node): its busy time, the number of launches, the share of GEMMs, and the kernels
that took the most time. On the CPU (smoke runs) it lists the aten ops by self CPU time instead.
"""
import re
import time

import torch

GEMM = re.compile(r"gemm|xmma|cutlass|cublas|nvjet|matmul", re.IGNORECASE)
NAME_CHARS = 90


def _short(name):
    return name if len(name) <= NAME_CHARS else name[: NAME_CHARS - 3] + "..."


def summarize(events, on_device, top=12):
    """events: torch.profiler key averages. Returns the summary dict (times in ms)."""
    from torch.autograd import DeviceType

    if on_device:
        rows = [(e.key, e.count, e.self_device_time_total / 1e3) for e in events
                if e.device_type == DeviceType.CUDA and e.self_device_time_total > 0]
    else:
        rows = [(e.key, e.count, e.self_cpu_time_total / 1e3) for e in events
                if e.device_type == DeviceType.CPU and e.self_cpu_time_total > 0]
    total = sum(ms for _, _, ms in rows)
    gemm = sum(ms for name, _, ms in rows if GEMM.search(name))
    rows.sort(key=lambda r: -r[2])
    return {
        "activity": "cuda" if on_device else "cpu",
        "busy_ms": total,
        "launches": sum(count for _, count, _ in rows),
        "gemm_share": gemm / total if total else None,
        "top": [{"name": _short(name), "calls": count, "ms": ms, "share": ms / total if total else None}
                for name, count, ms in rows[:top]],
    }


def profile_call(fn, device, top=12):
    """Summary of one call of fn (warm it up first: compilation and capture would dominate)."""
    from torch.profiler import ProfilerActivity, profile

    on_device = torch.device(device).type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_device else [])
    if on_device:
        torch.cuda.synchronize(device)
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        fn()
        if on_device:
            torch.cuda.synchronize(device)
        wall_ms = (time.perf_counter() - start) * 1e3
    summary = summarize(prof.key_averages(), on_device, top)
    summary["wall_ms"] = wall_ms
    return summary


def format_profile(case_name, summary):
    """A few lines: busy time, launches, GEMM share, then the top kernels."""
    if "error" in summary:
        return f"{case_name}: fast writer profile failed: {summary['error']}"
    what = "device busy" if summary["activity"] == "cuda" else "CPU self time"
    gemm = "-" if summary["gemm_share"] is None else f"{100 * summary['gemm_share']:.0f}%"
    lines = [f"{case_name}: fast writer profile: {what} {summary['busy_ms']:.2f} ms of {summary['wall_ms']:.2f} ms "
             f"wall, {summary['launches']} launches, GEMM {gemm}"]
    for row in summary["top"]:
        share = "-" if row["share"] is None else f"{100 * row['share']:5.1f}%"
        lines.append(f"  {row['ms']:9.3f} ms {share} {row['calls']:6d}x  {row['name']}")
    return "\n".join(lines)
