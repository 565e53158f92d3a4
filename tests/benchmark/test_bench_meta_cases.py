"""The meta-step benchmark cases on the CPU at tiny sizes: they run, agree, and report the evidence."""
import pytest
import torch

from gradmem_fast.benchmark import meta_cases


def test_meta_cases_have_the_specified_shapes():
    gpt2, kv = meta_cases.get_meta_case("meta-gpt2"), meta_cases.get_meta_case("meta-kv")
    assert (gpt2.config, gpt2.B, gpt2.T, gpt2.m, gpt2.K, gpt2.dtype, gpt2.answer) == ("gpt2-small", 8, 512, 8, 2,
                                                                                      "bf16", 16)
    assert (kv.config, kv.B, kv.T, kv.m, kv.K, kv.dtype) == ("kv", 64, 113, 8, 2, "fp32")
    with pytest.raises(ValueError, match="unknown meta case"):
        meta_cases.get_meta_case("meta-llama")


def test_meta_kv_smoke(monkeypatch):
    monkeypatch.setenv("GRADMEM_FAST_OP_BACKEND", "reference")  # the twins: no Triton interpreter at width 128
    case = meta_cases.get_meta_case("meta-kv").resized(B=2, T=9)
    entry = meta_cases.run_meta_case(case, "cpu", warmup=0, repeats=1)
    assert entry["fast_reason"] is None and entry["reference_reason"] is None
    assert entry["fast_ms"] > 0 and entry["reference_ms"] > 0
    assert entry["m0_grad_rel_err"] < 1e-4  # fp32 fast vs fp32 reference loop
    assert entry["fast_peak_gb"] is None  # no peak claimed off CUDA
    memory_bytes = case.B * case.m * 128 * 4
    assert entry["forward_saved_bytes"] == case.K * memory_bytes  # only M_0 .. M_{K-1}
    assert entry["recompute_step_nodes"] > 100 and entry["recompute_step_saved_bytes"] > memory_bytes
