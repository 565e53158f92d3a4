"""The public API on a CUDA device: same results as on the CPU."""
import copy

import pytest
import torch

import gradmem_fast
from helpers import FAMILIES, random_batch, rel_err, tiny_model

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("family", FAMILIES)
def test_reference_write_on_cuda_matches_cpu(family):
    cpu = tiny_model(family, dtype=torch.float64)
    ids, mask, memory = random_batch(cpu, 2, 9, lengths=[9, 4], m=3)
    want, want_losses = gradmem_fast.reference.write(cpu, memory, ids, mask, steps=3, lr=0.3, clip_norm=1.0,
                                                     return_losses=True)
    gpu = copy.deepcopy(cpu).cuda()
    got, got_losses = gradmem_fast.reference.write(gpu, memory.cuda(), ids.cuda(), mask.cuda(), steps=3, lr=0.3,
                                                   clip_norm=1.0, return_losses=True)
    assert got.device.type == "cuda"
    assert rel_err(got.cpu(), want) < 1e-10
    assert rel_err(got_losses.cpu(), want_losses) < 1e-6


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_read_and_memory_cache_on_cuda(family):
    model = tiny_model(family, dtype=torch.float32).cuda()
    ids, _, memory = random_batch(model, 2, 6, m=4, device="cuda")
    logits = gradmem_fast.read(model, memory, ids)
    cache = gradmem_fast.memory_cache(model, memory)
    cached = model(input_ids=ids, past_key_values=cache).logits
    assert rel_err(cached[:, :-1], logits[:, 1:]) < 1e-5


def test_second_order_on_cuda_with_sdpa():
    model = tiny_model("llama", dtype=torch.float32, attn="sdpa").cuda()
    ids, mask, memory = random_batch(model, 2, 7, lengths=[7, 5], m=2, device="cuda")
    memory.requires_grad_(True)
    out = gradmem_fast.write(model, memory, ids, mask, steps=2, lr=0.3, grad_mode="second",
                             backend="reference")
    grad, = torch.autograd.grad(out.square().sum(), memory)
    assert torch.isfinite(grad).all() and model.config._attn_implementation == "sdpa"


def test_device_mismatch_is_reported():
    model = tiny_model("llama", dtype=torch.float32).cuda()
    ids, mask, memory = random_batch(model, 1, 5, m=2)
    with pytest.raises(ValueError, match="input_ids is on cpu but the model is on cuda"):
        gradmem_fast.write(model, memory.cuda(), ids, mask, steps=1, lr=0.1)
