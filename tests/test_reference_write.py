"""gradmem_fast.reference.write against an independent per-sample autograd write, in float64."""
import pytest
import torch
from torch import nn

import gradmem_fast
from torch.nn.attention import SDPBackend, sdpa_kernel

from direct import direct_sample_loss, direct_write
from helpers import FAMILIES, random_batch, rel_err, tiny_model
from models.hf64 import hf_float64

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


def _clip(grad, clip_value, clip_norm):
    if clip_value is not None:
        grad = torch.clamp(grad, -clip_value, clip_value)
    if clip_norm is not None:
        grad = grad * torch.clamp(clip_norm / (torch.sqrt((grad ** 2).sum()) + 1e-6), max=1.0)
    return grad


def direct_meta_write(model, memory, ids, mask, steps, lr, second_steps, write_head=None, memory_proj=None,
                      clip_value=None, clip_norm=None):
    """Per-sample autograd loop: the last `second_steps` steps keep the inner gradient's graph, the earlier
    ones stop it; the losses keep their graph. Returns (memories (B, m, d), losses (B, K))."""
    outs, losses = [], []
    for b in range(ids.shape[0]):
        ids_b = ids[b, :int(mask[b].sum())]
        current = memory if memory.dim() == 2 else memory[b]
        if not current.requires_grad:
            current = current.detach().requires_grad_(True)
        sample_losses = []
        for k in range(steps):
            second = k >= steps - second_steps
            loss = direct_sample_loss(model, current, ids_b, write_head, memory_proj)
            grad, = torch.autograd.grad(loss, current, create_graph=second, retain_graph=True)
            if not second:
                grad = grad.detach()
            sample_losses.append(loss)
            current = current - lr * _clip(grad, clip_value, clip_norm)
        outs.append(current)
        losses.append(torch.stack(sample_losses))
    return torch.stack(outs), torch.stack(losses)


def _meta_setup(family="llama", seed=7):
    model = tiny_model(family, seed=seed)
    d, V = model.config.hidden_size, model.config.vocab_size
    ids, mask, memory = random_batch(model, 2, 6, lengths=[6, 4], m=2, seed=seed + 1)
    g = torch.Generator().manual_seed(seed + 2)
    head = (0.2 * torch.randn(V, d, generator=g, dtype=torch.float64)).requires_grad_(True)
    proj = nn.Linear(d, d).double()
    with torch.no_grad():
        proj.weight.copy_(torch.eye(d) + 0.1 * torch.randn(d, d, generator=g))
        proj.bias.copy_(0.1 * torch.randn(d, generator=g))
    layer_weight = model.get_input_embeddings().weight
    layer_weight.requires_grad_(True)
    memory.requires_grad_(True)
    params = [memory, head, proj.weight, proj.bias, layer_weight]
    return model, ids, mask, memory, dict(write_head=head, memory_proj=proj), params


def _outer(out, losses):
    g = torch.Generator().manual_seed(11)
    w_out = torch.randn(out.shape, generator=g, dtype=torch.float64)
    w_loss = torch.randn(losses.shape, generator=g, dtype=torch.float64)
    return (out * w_out).sum() + (losses.double() * w_loss).sum()


@pytest.mark.parametrize("second_steps", [0, 1, 3])
@pytest.mark.parametrize("clip", [{}, {"clip_norm": 0.5, "clip_value": 0.05}])
def test_second_order_steps_and_losses_match_direct(second_steps, clip):
    model, ids, mask, memory, kw, params = _meta_setup()
    kw.update(clip)
    with hf_float64(model):
        _check_second_order_steps(model, ids, mask, memory, kw, params, second_steps)


def _check_second_order_steps(model, ids, mask, memory, kw, params, second_steps):
    out, losses = gradmem_fast.reference.write(model, memory, ids, mask, steps=3, lr=0.3, grad_mode="second",
                                               second_order_steps=second_steps, return_losses=True, **kw)
    assert losses.requires_grad and losses.dtype == torch.float32
    grads = torch.autograd.grad(_outer(out, losses), params)
    expected, expected_losses = direct_meta_write(model, memory, ids, mask, 3, 0.3, second_steps, **kw)
    expected_grads = torch.autograd.grad(_outer(expected, expected_losses.float()), params)
    assert rel_err(out.detach(), expected.detach()) < TOL_FP64
    assert rel_err(losses.detach(), expected_losses.detach()) < 1e-6
    for got, want in zip(grads, expected_grads):
        assert rel_err(got, want) < 1e-9
    if second_steps == 0:  # no second-order step: the same gradients as grad_mode="first"
        out1, losses1 = gradmem_fast.reference.write(model, memory, ids, mask, steps=3, lr=0.3, grad_mode="first",
                                                     return_losses=True, **kw)
        for got, want in zip(torch.autograd.grad(_outer(out1, losses1), params), grads):
            assert rel_err(got, want) < 1e-12


def test_first_order_losses_are_differentiable():
    model, ids, mask, memory, kw, params = _meta_setup("gpt2", seed=3)
    with hf_float64(model):
        out, losses = gradmem_fast.reference.write(model, memory, ids, mask, steps=2, lr=0.4, grad_mode="first",
                                                   return_losses=True, **kw)
        grads = torch.autograd.grad(losses.double().sum(), params)
        expected, expected_losses = direct_meta_write(model, memory, ids, mask, 2, 0.4, 0, **kw)
    expected_grads = torch.autograd.grad(expected_losses.float().double().sum(), params)
    for got, want in zip(grads, expected_grads):
        assert rel_err(got, want) < 1e-9
    assert grads[0].abs().max() > 0 and grads[-1].abs().max() > 0


def test_second_order_steps_all_equals_none():
    model, ids, mask, memory, kw, params = _meta_setup(seed=5)
    a = gradmem_fast.reference.write(model, memory, ids, mask, steps=2, lr=0.3, grad_mode="second", **kw)
    b = gradmem_fast.reference.write(model, memory, ids, mask, steps=2, lr=0.3, grad_mode="second",
                                     second_order_steps=2, **kw)
    assert torch.equal(a, b)
    for x, y in zip(torch.autograd.grad(a.sum(), params), torch.autograd.grad(b.sum(), params)):
        assert torch.equal(x, y)


@pytest.mark.parametrize("mode", ["none", "first", "second"])
def test_losses_carry_no_graph_without_inputs_that_require_grad(mode):
    model = tiny_model("qwen2")
    ids, mask, memory = random_batch(model, 2, 5, lengths=[5, 2], m=2)
    out, losses = gradmem_fast.reference.write(model, memory, ids, mask, steps=2, lr=0.2, grad_mode=mode,
                                               return_losses=True)
    assert not losses.requires_grad


@pytest.mark.parametrize("value, mode, match", [
    (-1, "second", "outside 0..steps"), (3, "second", "outside 0..steps"), (True, "second", "an int"),
    (1.0, "second", "an int"), (1, "first", "needs grad_mode='second'"), (0, "none", "needs grad_mode='second'")])
def test_second_order_steps_rejected(value, mode, match):
    model = tiny_model("llama")
    ids, mask, memory = random_batch(model, 1, 4, m=2)
    for write in (gradmem_fast.reference.write, gradmem_fast.write):
        with pytest.raises(ValueError, match=match):
            write(model, memory, ids, mask, steps=2, lr=0.1, grad_mode=mode, second_order_steps=value)
