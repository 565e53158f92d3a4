"""gradmem_fast.reference.write against an independent per-sample autograd write, in float64."""
import pytest
import torch
from torch import nn

import gradmem_fast
from torch.nn.attention import SDPBackend, sdpa_kernel

from direct import direct_write
from helpers import FAMILIES, random_batch, rel_err, tiny_model

TOL_FP64 = 1e-10
# The exactness tests run the models with SDPA, which is float64-exact on the CPU. Hugging Face's eager
# attention runs its softmax in float32 whatever the model's dtype: with it a padded batch and an
# unpadded sample differ by about 1e-7, which says nothing about the write.
EXACT = "sdpa"


@pytest.mark.parametrize("family", FAMILIES)
def test_matches_direct_ragged(family):
    model = tiny_model(family, attn=EXACT)
    ids, mask, memory = random_batch(model, 3, 9, lengths=[9, 1, 5], m=3, seed=1)
    out, losses = gradmem_fast.reference.write(model, memory, ids, mask, steps=3, lr=0.3, return_losses=True)
    expected, expected_losses = direct_write(model, memory, ids, mask, 3, 0.3)
    assert out.shape == (3, 3, model.config.hidden_size) and out.dtype == torch.float64
    assert losses.shape == (3, 3) and losses.dtype == torch.float32
    assert rel_err(out, expected) < TOL_FP64
    assert rel_err(losses, expected_losses) < 1e-6  # losses are returned in float32
    assert not torch.equal(out, memory.expand_as(out))


@pytest.mark.parametrize("option", ["write_head", "memory_proj", "clip_value", "clip_norm", "all"])
def test_options_match_direct(option):
    model = tiny_model("llama", seed=2)
    d, V = model.config.hidden_size, model.config.vocab_size
    ids, mask, memory = random_batch(model, 2, 8, lengths=[8, 6], m=4, seed=3)
    g = torch.Generator().manual_seed(4)
    kw = {}
    if option in ("write_head", "all"):
        kw["write_head"] = 0.2 * torch.randn(V, d, generator=g, dtype=torch.float64)
    if option in ("memory_proj", "all"):
        proj = nn.Linear(d, d).double()
        with torch.no_grad():
            proj.weight.copy_(torch.eye(d) + 0.1 * torch.randn(d, d, generator=g))
            proj.bias.copy_(0.1 * torch.randn(d, generator=g))
        kw["memory_proj"] = proj
    if option in ("clip_value", "all"):
        kw["clip_value"] = 0.01
    if option in ("clip_norm", "all"):
        kw["clip_norm"] = 0.05
    out, losses = gradmem_fast.reference.write(model, memory, ids, mask, steps=2, lr=0.5, return_losses=True, **kw)
    expected, expected_losses = direct_write(model, memory, ids, mask, 2, 0.5, **kw)
    assert rel_err(out, expected) < TOL_FP64
    assert rel_err(losses, expected_losses) < 1e-6


def test_clipping_is_active():
    model = tiny_model("gpt2")
    ids, mask, memory = random_batch(model, 2, 6, m=2)
    plain = gradmem_fast.reference.write(model, memory, ids, mask, steps=1, lr=1.0)
    clipped = gradmem_fast.reference.write(model, memory, ids, mask, steps=1, lr=1.0, clip_norm=1e-3)
    step = (clipped - memory).flatten(1).norm(dim=1)
    assert torch.all(step <= 1e-3 * (1 + 1e-9)) and not torch.allclose(plain, clipped)


def test_zero_steps_and_batched_memory():
    model = tiny_model("gpt_neox")
    ids, mask, memory = random_batch(model, 2, 5, m=3)
    per_sample = torch.stack([memory, 2 * memory])
    out, losses = gradmem_fast.reference.write(model, per_sample, ids, mask, steps=0, lr=0.1, return_losses=True)
    assert torch.equal(out, per_sample) and losses.shape == (2, 0)
    out = gradmem_fast.reference.write(model, per_sample, ids, mask, steps=2, lr=0.2)
    expected, _ = direct_write(model, per_sample, ids, mask, 2, 0.2)
    assert rel_err(out, expected) < TOL_FP64


def test_first_order_gradient_is_identity():
    model = tiny_model("llama", attn=EXACT)
    ids, mask, memory = random_batch(model, 3, 6, lengths=[6, 2, 4], m=2)
    memory.requires_grad_(True)
    out = gradmem_fast.reference.write(model, memory, ids, mask, steps=3, lr=0.4, grad_mode="first")
    expected, _ = direct_write(model, memory.detach(), ids, mask, 3, 0.4)
    assert rel_err(out.detach(), expected) < TOL_FP64
    weights = torch.randn_like(out)
    (out * weights).sum().backward()
    assert torch.allclose(memory.grad, weights.sum(0), rtol=0, atol=1e-12)


def test_none_mode_is_detached():
    model = tiny_model("llama")
    ids, mask, memory = random_batch(model, 1, 4)
    memory.requires_grad_(True)
    out = gradmem_fast.reference.write(model, memory, ids, mask, steps=1, lr=0.1)
    assert not out.requires_grad


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_second_order_matches_direct(attn):
    model = tiny_model("llama", attn=attn, seed=5)
    d, V = model.config.hidden_size, model.config.vocab_size
    ids, mask, memory = random_batch(model, 2, 6, lengths=[6, 3], m=2, seed=6)
    head = (0.2 * torch.randn(V, d, dtype=torch.float64)).requires_grad_(True)
    proj = nn.Linear(d, d).double()
    layer_weight = model.model.layers[0].mlp.down_proj.weight
    layer_weight.requires_grad_(True)
    memory.requires_grad_(True)
    params = [memory, head, proj.weight, layer_weight]

    out = gradmem_fast.reference.write(model, memory, ids, mask, steps=2, lr=0.3, write_head=head,
                                       memory_proj=proj, clip_norm=0.5, grad_mode="second")
    assert model.config._attn_implementation == attn  # restored after the write
    grads = torch.autograd.grad((out ** 2).sum(), params)

    # the independent computation: torch's math SDPA (float64-exact and twice differentiable)
    model.set_attn_implementation("sdpa")
    with sdpa_kernel(SDPBackend.MATH):
        expected, _ = direct_write(model, memory, ids, mask, 2, 0.3, write_head=head, memory_proj=proj,
                                   clip_norm=0.5, create_graph=True)
        expected_grads = torch.autograd.grad((expected ** 2).sum(), params)
    assert rel_err(out.detach(), expected.detach()) < TOL_FP64
    for got, want in zip(grads, expected_grads):
        assert rel_err(got, want) < 1e-9

    first = gradmem_fast.reference.write(model, memory, ids, mask, steps=2, lr=0.3, write_head=head,
                                         memory_proj=proj, clip_norm=0.5, grad_mode="first")
    first_grad, = torch.autograd.grad((first ** 2).sum(), memory)
    assert rel_err(first_grad, grads[0]) > 1e-6  # second order really differs from first order


def test_public_write_reference_backend_matches_reference():
    model = tiny_model("qwen2")
    ids, mask, memory = random_batch(model, 2, 7, lengths=[7, 3], m=5)
    a = gradmem_fast.write(model, memory, ids, mask, steps=2, lr=0.2, backend="reference")
    b = gradmem_fast.reference.write(model, memory, ids, mask, steps=2, lr=0.2)
    assert torch.equal(a, b)
