"""The reference's own attention: float64-exact against SDPA, twice differentiable, restored after use."""
import pytest
import torch

import gradmem_fast
from gradmem_fast.reference.attention import ATTENTION_NAME, reference_attention, reference_attention_mode
from helpers import FAMILIES, random_batch, rel_err, tiny_model


@pytest.mark.parametrize("family", FAMILIES)
def test_model_logits_match_sdpa_in_float64(family):
    model = tiny_model(family, attn="sdpa")
    ids, mask, _ = random_batch(model, 3, 9, lengths=[9, 4, 1], seed=7)
    expected = model(input_ids=ids, attention_mask=mask).logits
    with reference_attention_mode(model):
        assert model.config._attn_implementation == ATTENTION_NAME
        got = model(input_ids=ids, attention_mask=mask).logits
    assert model.config._attn_implementation == "sdpa"
    real = mask.bool()
    assert rel_err(got[real], expected[real]) < 1e-13


def test_keeps_float64_where_hf_eager_does_not():
    model = tiny_model("llama", attn="eager")
    ids, _, _ = random_batch(model, 1, 12, seed=8)
    with reference_attention_mode(model):
        ours = model(input_ids=ids).logits
    model.set_attn_implementation("sdpa")
    sdpa = model(input_ids=ids).logits
    model.set_attn_implementation("eager")
    hf_eager = model(input_ids=ids).logits
    assert rel_err(ours, sdpa) < 1e-13
    assert rel_err(hf_eager, sdpa) > 1e-10  # HF's eager softmax runs in float32


class _Module(torch.nn.Module):
    pass


@pytest.mark.parametrize("groups", [1, 2])
def test_double_backward_gradgradcheck(groups):
    g = torch.Generator().manual_seed(9)
    B, Hkv, S, D = 2, 2, 5, 4
    q = torch.randn(B, Hkv * groups, S, D, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(B, Hkv, S, D, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(B, Hkv, S, D, generator=g, dtype=torch.float64, requires_grad=True)
    causal = torch.full((S, S), float("-inf"), dtype=torch.float64).triu(1)
    mask = causal.expand(B, 1, S, S).clone()
    mask[1, :, :, 3:] = float("-inf")  # sample 1 has 3 real tokens
    mask[1, :, 3:, 0] = 0.0  # its padded rows keep one key, as HF's masks do
    module = _Module().eval()

    def f(q, k, v):
        return reference_attention(module, q, k, v, mask, scaling=0.3)[0]

    assert torch.autograd.gradcheck(f, (q, k, v))
    assert torch.autograd.gradgradcheck(f, (q, k, v))


def test_second_order_write_restores_setting_and_needs_no_eager():
    model = tiny_model("gpt_neox", attn="sdpa")
    ids, mask, memory = random_batch(model, 2, 6, lengths=[6, 4], m=2, seed=10)
    memory.requires_grad_(True)
    out = gradmem_fast.reference.write(model, memory, ids, mask, steps=2, lr=0.3, grad_mode="second")
    grad, = torch.autograd.grad(out.square().sum(), memory)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    assert model.config._attn_implementation == "sdpa"


def test_refuses_attention_sinks():
    module = _Module().eval()
    x = torch.randn(1, 1, 2, 4, dtype=torch.float64)
    with pytest.raises(NotImplementedError, match="s_aux"):
        reference_attention(module, x, x, x, None, s_aux=torch.zeros(1))
