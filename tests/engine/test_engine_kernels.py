"""The fast engine with the ops' Triton kernels (interpreter on CPU) against the float64 reference."""
import warnings

import pytest

from engine_cases import GEMMA3_HEAD_DIM_256, TRITON_OPS, WIDE, model_pair, refuse_twins, write_both
from helpers import rel_err


def check_kernel_write(monkeypatch, family, B, T, lengths, m, steps, tol, widths):
    # a silent fallback to a twin would make this test pointless: the twins must not be reached
    refuse_twins(monkeypatch, TRITON_OPS)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        # older Triton interpreters convert 1-element numpy arrays to scalars, which numpy deprecates
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"triton\.")
        out, losses, ref, ref_losses, start = write_both(family, B=B, T=T, lengths=lengths, m=m, steps=steps,
                                                         op_backend="auto", seed=11, **widths)
    assert rel_err(out, ref) < tol and rel_err(losses, ref_losses) < tol
    assert rel_err(ref, start.expand_as(ref)) > 1e-3


@pytest.mark.parametrize("family, B, T, lengths, m, steps, tol", [
    ("llama", 2, 9, [9, 4], 3, 2, 1e-4),
    ("gpt2", 1, 6, None, 2, 1, 1e-4),
    ("gpt_neox", 2, 5, [5, 1], 1, 1, 1e-4),
    ("qwen3", 2, 7, [7, 3], 2, 2, 1e-4),
    ("olmo2", 2, 6, [6, 2], 3, 2, 1e-4),
    ("olmo2", 1, 5, None, 2, 1, 1e-4),
    ("phi3", 2, 6, [6, 4], 2, 1, 1e-4),
    ("gemma3_text", 2, 6, [6, 3], 2, 2, 1e-4),
    ("gemma3_text", 1, 5, None, 3, 1, 1e-4),
])
@pytest.mark.needs_triton
def test_kernels_fp32(family, B, T, lengths, m, steps, tol, monkeypatch):
    check_kernel_write(monkeypatch, family, B, T, lengths, m, steps, tol, WIDE[family])


@pytest.mark.needs_triton
def test_kernels_fp32_gemma3_head_dim_256(monkeypatch):
    """Gemma 3 at its released head dim, 256, takes the attention kernels: no twin, no warning."""
    assert model_pair("gemma3_text", **GEMMA3_HEAD_DIM_256)[0].model.layers[0].self_attn.head_dim == 256
    check_kernel_write(monkeypatch, "gemma3_text", 2, 6, [6, 3], 2, 2, 1e-4, GEMMA3_HEAD_DIM_256)
