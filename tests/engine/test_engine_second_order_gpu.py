"""Meta-gradients through the fast write on CUDA: float32 against the float64 reference, bf16 within 2x the
error of the bf16 reference loop, and peak device memory flat in K. The forward runs the engine's kernels
(op backend "auto"); the backward's recompute runs attention and the head + loss on their Triton kernels
and the other ops' written second-order rules on the device."""
import copy

import pytest
import torch

import gradmem_fast
from engine_cases import WIDE, fast_kwargs
from gradmem_fast.engine import fast_write
from helpers import random_batch, rel_err, tiny_model
from models.hf64 import hf_float64
from test_engine_second_order import _outer

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def no_tf32():
    previous = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = previous


def _gradients(write, model, memory, ids, mask, steps, seed, **kw):
    start = memory.clone().requires_grad_(True)
    out, losses = write(model, start, ids, mask, steps=steps, lr=0.4, grad_mode="second", return_losses=True, **kw)
    grads = torch.autograd.grad(_outer(out.cpu(), losses.cpu(), seed), [start, *model.parameters()],
                                allow_unused=True)
    return [None if g is None else g.double().cpu() for g in grads]


def _fast(model, start, ids, mask, **kw):
    return fast_write(model, start, ids, mask, op_backend="auto", **fast_kwargs({}), **kw)


def _setup(family, dtype, seed):
    model64 = tiny_model(family, dtype=torch.float64, seed=seed, **WIDE.get(family, WIDE["llama"]))
    model = copy.deepcopy(model64).to("cuda", dtype)
    model64.requires_grad_(True)
    model.requires_grad_(True)
    ids, mask, memory = random_batch(model64, 3, 40, lengths=[40, 17, 5], m=8, seed=seed + 1)
    return model64, model, ids, mask, memory[None]


def _reference64(model64, ids, mask, memory, seed):
    with hf_float64(model64):
        return _gradients(gradmem_fast.reference.write, model64, memory, ids, mask, 2, seed)


@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neox", "qwen3", "olmo2", "phi3", "gemma3_text"])
def test_fp32_gradients_match_reference(family):
    model64, model, ids, mask, memory = _setup(family, torch.float32, seed=1)
    want = _reference64(model64, ids, mask, memory, 1)
    got = _gradients(_fast, model, memory.float().cuda(), ids.cuda(), mask.cuda(), 2, 1)
    for g, w in zip(got, want):
        assert (g is None) == (w is None)
        if w is not None:
            assert rel_err(g, w) < 1e-4


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_bf16_within_twice_the_reference_loop_error(family):
    model64, model, ids, mask, memory = _setup(family, torch.bfloat16, seed=2)
    want = _reference64(model64, ids, mask, memory, 2)
    args = (memory.to("cuda", torch.bfloat16), ids.cuda(), mask.cuda(), 2, 2)
    got = _gradients(_fast, model, *args)
    loop = _gradients(gradmem_fast.reference.write, model, *args)
    for g, r, w in zip(got, loop, want):
        if w is not None:
            assert rel_err(g, w) <= 2 * rel_err(r, w) + 1e-3


def test_peak_memory_flat_in_steps():
    model = tiny_model("llama", dtype=torch.float32, seed=3, hidden_size=256, intermediate_size=512,
                       num_attention_heads=4, num_key_value_heads=4).cuda()
    model.requires_grad_(True)
    ids, mask, memory = random_batch(model, 4, 256, m=8, seed=4, device="cuda")
    peaks = {}
    for steps in (2, 8):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        start = memory[None].clone().requires_grad_(True)
        out = _fast(model, start, ids, mask, steps=steps, lr=0.3, grad_mode="second", return_losses=False)
        out.square().sum().backward()
        torch.cuda.synchronize()
        peaks[steps] = torch.cuda.max_memory_allocated() - base
        model.zero_grad(set_to_none=True)
    assert peaks[8] <= 1.1 * peaks[2]


def test_graph_forward_equals_eager():
    """The forward steps replayed from the first-order write's captured graph: the same meta-gradients as the
    eager forward (the graph pads the context to its length bucket, so equal to rounding, not bit for bit)."""
    model64, model, ids, mask, memory = _setup("llama", torch.float32, seed=5)
    args = (memory.float().cuda(), ids.cuda(), mask.cuda(), 3, 5)
    by_graph = _gradients(_fast, model, *args, use_graphs=True)
    eager = _gradients(_fast, model, *args, use_graphs=False)
    for g, e in zip(by_graph, eager):
        assert (g is None) == (e is None)
        if e is not None:
            assert rel_err(g, e) < 1e-5
