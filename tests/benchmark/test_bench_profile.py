"""The fast writer's profile: the per-kernel summary and the bench command's --profile output."""
import json
from types import SimpleNamespace

import torch
from torch.autograd import DeviceType

from gradmem_fast.benchmark.cli import main
from gradmem_fast.benchmark.profile import format_profile, profile_call, summarize


def _event(key, count, device_us=0.0, cpu_us=0.0, device_type=DeviceType.CUDA):
    return SimpleNamespace(key=key, count=count, self_device_time_total=device_us, self_cpu_time_total=cpu_us,
                           device_type=device_type)


def test_summary_of_device_kernels():
    events = [
        _event("nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NTN", 40, device_us=6000.0),
        _event("_attn_fwd_kernel", 12, device_us=1500.0),
        _event("add_norm_fwd_kernel<c10::BFloat16, 8>", 25, device_us=500.0),
        _event("aten::mm", 40, cpu_us=900.0, device_type=DeviceType.CPU),  # host side: not device work
        _event("Memset (Device)", 3, device_us=0.0),  # no time: left out
    ]
    summary = summarize(events, on_device=True, top=2)
    assert summary["activity"] == "cuda" and summary["launches"] == 77
    assert abs(summary["busy_ms"] - 8.0) < 1e-12 and abs(summary["gemm_share"] - 0.75) < 1e-12
    assert [row["name"] for row in summary["top"]] == ["nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NTN", "_attn_fwd_kernel"]
    assert summary["top"][1] == {"name": "_attn_fwd_kernel", "calls": 12, "ms": 1.5, "share": 1.5 / 8.0}
    assert len(summarize([_event("x" * 200, 1, device_us=1.0)], True)["top"][0]["name"]) == 90


def test_profile_of_a_cpu_call_lists_its_ops():
    a = torch.randn(64, 64)
    summary = profile_call(lambda: (a @ a).relu_(), "cpu")
    names = [row["name"] for row in summary["top"]]
    assert summary["activity"] == "cpu" and "aten::mm" in names and summary["wall_ms"] > 0
    text = format_profile("case", summary)
    assert text.startswith("case: fast writer profile: CPU self time") and "aten::mm" in text
    assert format_profile("case", {"error": "RuntimeError: x"}) == "case: fast writer profile failed: RuntimeError: x"


def test_bench_profile_flag(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the CPU path of the ops: their PyTorch twins
    out = tmp_path / "results"
    argv = ["bench", "--device", "cpu", "--quick", "--context", "24", "--batch", "1", "--repeats", "1",
            "--out-dir", str(out), "--profile"]
    assert main(argv) == 0
    (case,) = json.loads((out / "latest.json").read_text())["cases"]
    printed = capsys.readouterr().out
    assert case["fast_ms"] is not None, case["fast_reason"]  # the engine runs on CPU with the ops' twins
    profile = case["fast_profile"]
    assert profile["activity"] == "cpu" and profile["launches"] > 0 and profile["top"]
    assert "kv-latency: fast writer profile: CPU self time" in printed
