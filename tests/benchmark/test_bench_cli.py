"""The bench command: refusal without a GPU, a CPU smoke run's JSON, --plot and --gpu-tests."""
import json
import os

import pytest
import torch

from gradmem_fast.benchmark import report
from gradmem_fast.benchmark.cli import main

CASE_KEYS = {  # key: allowed types in a CPU smoke run's case entry
    "case": (str,), "B": (int,), "T": (int,), "m": (int,), "K": (int,), "dtype": (str,),
    "plain_ms": (float,), "compiled_ms": (type(None),), "reference_ms": (float,),
    "fast_ms": (float, type(None)), "floor_ms": (type(None),), "plain_peak_gb": (type(None),),
    "fast_peak_gb": (type(None),), "fast_rel_err": (float, type(None)), "fast_reason": (str, type(None)),
}
JUNIT = """<?xml version="1.0" encoding="utf-8"?>
<testsuites><testsuite name="pytest" errors="1" failures="2" skipped="3" tests="17" time="1.0">
</testsuite></testsuites>
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_without_gpu_it_refuses(capsys, tmp_path):
    assert main(["bench", "--quick", "--out-dir", str(tmp_path)]) != 0
    assert "no CUDA device" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []


def test_cpu_needs_quick(capsys, tmp_path):
    assert main(["--device", "cpu", "--out-dir", str(tmp_path)]) != 0
    assert "--quick" in capsys.readouterr().err


@pytest.mark.parametrize("argv, named", [(["--cases", "kv-latency,gpt3"], "gpt3"), (["--context", "0"], "--context")])
def test_bad_arguments_are_named(capsys, tmp_path, argv, named):
    assert main(["--device", "cpu", "--quick", "--out-dir", str(tmp_path)] + argv) == 2
    assert named in capsys.readouterr().err


def test_cpu_smoke_run_writes_the_json_schema(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the CPU path of the ops: their PyTorch twins
    junit = tmp_path / "junit.xml"
    junit.write_text(JUNIT)
    out = tmp_path / "results"
    argv = ["bench", "--device", "cpu", "--quick", "--context", "40", "--batch", "2", "--repeats", "1",
            "--out-dir", str(out), "--gpu-tests", str(junit)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    result = json.loads((out / "latest.json").read_text())
    assert (out / f"cpu-{result['date']}.json").read_text() == (out / "latest.json").read_text()
    assert result["card"] == "cpu" and result["matmul_tflops"] is None
    assert result["torch"] == torch.__version__ and isinstance(result["triton"], (str, type(None)))
    assert result["gpu_tests"] == {"passed": 11, "failed": 3, "skipped": 3}
    (case,) = result["cases"]
    for key, types in CASE_KEYS.items():
        assert isinstance(case[key], types), (key, case[key])
    assert (case["case"], case["B"], case["T"], case["m"], case["K"], case["dtype"]) == ("kv-latency", 2, 40, 8, 5, "fp32")
    assert case["plain_ms"] > 0 and case["reference_ms"] > 0
    assert case["reference_rel_err_vs_plain"] < 1e-5  # fp32: same write, two implementations
    assert (case["fast_ms"] is None) == (case["fast_reason"] is not None)
    if case["fast_ms"] is None:
        assert case["fast_rel_err"] is None and "fast not measured" in printed
    else:
        assert case["fast_rel_err"] < 1e-4
    assert "kv-latency" in printed and "floor_ms is null" in printed


def test_plot_from_json(tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "run.json"
    path.write_text(json.dumps(_result()))
    assert main(["bench", "--plot", str(path)]) == 0
    assert (tmp_path / "run.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib_says_so(tmp_path, monkeypatch, capsys):
    def no_matplotlib(*args):
        raise ImportError("matplotlib")

    monkeypatch.setattr(report, "plot", no_matplotlib)
    path = tmp_path / "run.json"
    path.write_text(json.dumps(_result()))
    assert main(["--plot", str(path)]) == 1
    assert "matplotlib is not importable" in capsys.readouterr().err


def test_gpu_tests_from_a_summary_line(tmp_path):
    path = tmp_path / "summary.txt"
    path.write_text("collected 20 items\n== 7 passed, 1 failed, 2 skipped, 10 deselected, 1 error in 3.1s ==\n")
    assert report.read_gpu_tests(str(path)) == {"passed": 7, "failed": 2, "skipped": 2}
    junit = tmp_path / "junit.xml"
    junit.write_text(JUNIT)
    assert report.sum_gpu_tests([str(path), str(junit)]) == {"passed": 18, "failed": 5, "skipped": 5}
    path.write_text("nothing ran\n")
    with pytest.raises(ValueError, match="summary"):
        report.read_gpu_tests(str(path))


def test_card_slug_and_table():
    assert report.card_slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert report.card_slug(" (?) ") == "unknown"
    table = report.format_table(_result())
    assert "gpt2-latency" in table and "NVIDIA H200" in table
    assert "fast not measured: engine missing" in table


def _result():
    case = {"case": "gpt2-latency", "B": 1, "T": 512, "m": 16, "K": 5, "dtype": "bf16", "plain_ms": 90.4,
            "compiled_ms": 14.6, "reference_ms": 95.0, "fast_ms": None, "fast_reason": "engine missing",
            "floor_ms": 1.81, "plain_peak_gb": 0.9, "fast_peak_gb": None, "fast_rel_err": None,
            "fast_over_floor": None, "plain_over_fast": None, "compiled_over_fast": None}
    return {"card": "NVIDIA H200", "torch": "2.11.0", "triton": "3.6.0", "matmul_tflops": 770.0,
            "date": "2026-11-26", "cases": [case], "gpu_tests": None}


@pytest.mark.gpu
def test_gpu_run_fills_floor_and_peaks(tmp_path):
    out = tmp_path / "results"
    assert main(["--cases", "kv-latency", "--context", "64", "--warmup", "1", "--repeats", "2",
                 "--no-compile", "--out-dir", str(out)]) == 0
    result = json.loads((out / "latest.json").read_text())
    assert result["matmul_tflops"] > 10.0 and result["card"] != "cpu"
    (case,) = result["cases"]
    assert case["floor_ms"] > 0 and case["plain_peak_gb"] > 0 and case["reference_peak_gb"] > 0
    assert case["reference_rel_err_vs_plain"] < 1e-4
    if case["fast_ms"] is not None:
        assert case["fast_peak_gb"] > 0 and case["fast_rel_err"] < 1e-3


def test_meta_cases_run_only_when_named(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("GRADMEM_FAST_OP_BACKEND", "reference")  # the twins: no Triton interpreter at width 128
    out = tmp_path / "results"
    argv = ["--device", "cpu", "--quick", "--cases", "meta-kv", "--batch", "2", "--context", "9",
            "--warmup", "0", "--repeats", "1", "--out-dir", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    result = json.loads((out / "latest.json").read_text())
    assert result["cases"] == []
    (meta,) = result["meta_cases"]
    assert (meta["case"], meta["B"], meta["T"], meta["K"]) == ("meta-kv", 2, 9, 2)
    assert meta["reference_ms"] > 0 and meta["fast_ms"] > 0 and meta["m0_grad_rel_err"] < 1e-4
    assert "meta-kv: reference_over_fast" in printed and "recompute nodes" in printed


@pytest.mark.gpu
def test_gpu_meta_case_measures_peaks_flat_in_k(tmp_path):
    out = tmp_path / "results"
    assert main(["--cases", "meta-kv", "--batch", "8", "--warmup", "1", "--repeats", "2", "--out-dir", str(out)]) == 0
    (meta,) = json.loads((out / "latest.json").read_text())["meta_cases"]
    assert meta["reference_peak_gb"] > 0 and meta["fast_peak_gb"] > 0 and meta["fast_peak_k8_gb"] > 0
    assert meta["m0_grad_rel_err"] < 1e-3
