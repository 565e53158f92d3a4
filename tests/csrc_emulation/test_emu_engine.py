"""The whole fast writer with every op on its kernel: Triton under the interpreter, csrc under the CPU
emulator. Checks the engine's calls into the csrc ops (layouts, out= buffers, in-place rotary, the
device-side lr) against the float64 reference write, which a GPU would otherwise be the first to see."""
import os
import sys

import pytest

import gradmem_fast.ops.activation as activation
import gradmem_fast.ops.add_norm as add_norm
import gradmem_fast.ops.memory_update as memory_update
import gradmem_fast.ops.rotary as rotary
from helpers import rel_err

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "engine"))
from engine_cases import TRITON_OPS, WIDE, refuse_twins, write_both  # noqa: E402

TOL_FP32 = 1e-4
TWINS = {  # every op the engine calls: its twin must never run here
    **TRITON_OPS,
    add_norm: ("add_norm_forward", "add_norm_backward"),
    rotary: ("rotary_tables", "apply_rotary_"),
    activation: ("swiglu_forward", "swiglu_backward", "gelu_forward", "gelu_backward"),
    memory_update: ("memory_update_",),
}


@pytest.mark.needs_triton
@pytest.mark.parametrize("family, B, T, lengths, m, steps, options", [
    ("llama", 2, 9, [9, 4], 3, 2, ()),
    ("qwen2", 1, 6, None, 2, 2, ("clip_norm",)),
    ("gpt2", 2, 7, [7, 2], 2, 2, ("memory_proj", "clip_value")),
    ("gpt_neox", 2, 5, [5, 1], 1, 2, ("write_head",)),
])
def test_engine_on_kernels_matches_reference(emulated, monkeypatch, family, B, T, lengths, m, steps, options):
    refuse_twins(monkeypatch, TWINS)
    out, losses, ref, ref_losses, start = write_both(
        family, B=B, T=T, lengths=lengths, m=m, steps=steps, option_names=options, op_backend="kernel", seed=13,
        **WIDE.get(family, WIDE["llama"]))
    assert rel_err(out, ref) < TOL_FP32 and rel_err(losses, ref_losses) < TOL_FP32
    assert rel_err(ref, start.expand_as(ref)) > 1e-3  # the write moved the memory
