"""forward_hidden from the spec against the Hugging Face model's logits, float64, ragged padding."""
import pytest
import torch

from gradmem_fast.models import describe
from gradmem_fast.models.forward import forward_hidden
from helpers import rel_err, tiny_model
from models.hf64 import hf_float64

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64, "rope_theta": 500000.0}
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "rope_theta": 10000.0}

PARTIAL = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}

CASES = [
    ("llama", {}),
    ("llama", {"tie_word_embeddings": True}),
    ("llama", {"attention_bias": True, "mlp_bias": True, "num_key_value_heads": 4}),
    ("llama", {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}}),
    ("llama", {"rope_parameters": LLAMA3}),
    ("llama", {"rope_parameters": YARN, "num_key_value_heads": 1}),
    ("llama", {"head_dim": 16}),
    ("mistral", {}),
    ("mistral", {"sliding_window": 16}),
    ("qwen2", {}),
    ("gpt2", {}),
    ("gpt2", {"tie_word_embeddings": False, "activation_function": "gelu", "n_inner": 40}),
    ("gpt2", {"scale_attn_weights": False}),
    ("gpt_neox", {}),
    ("gpt_neox", {"use_parallel_residual": False}),
    ("gpt_neox", {"rotary_pct": 1.0, "tie_word_embeddings": True}),
    ("gpt_neox", {"attention_bias": False, "hidden_act": "gelu_new"}),
    ("qwen3", {}),
    ("qwen3", {"attention_bias": True, "num_key_value_heads": 1, "tie_word_embeddings": True}),
    ("olmo2", {}),
    ("olmo2", {"num_key_value_heads": 4, "attention_bias": True}),
    ("phi3", {}),
    ("phi3", {"rope_parameters": PARTIAL, "num_key_value_heads": 4}),
    ("gemma3_text", {}),
    ("gemma3_text", {"num_hidden_layers": 3, "tie_word_embeddings": True, "num_key_value_heads": 1}),
]


def _ids(case):
    family, over = case
    return family + "".join(f"-{k}" for k in over)


def _hf_logits(model, x, lengths):
    mask = (torch.arange(x.shape[1])[None, :] < lengths[:, None]).long()
    with hf_float64(model):
        return model(inputs_embeds=x, attention_mask=mask).logits


def _real_rows_err(out, ref, lengths):
    return max(rel_err(out[b, :L], ref[b, :L]) for b, L in enumerate(lengths.tolist()))


# (B, S, lengths) per call; lengths None means all rows valid
BATCHES = [(3, 16, [16, 1, 7]), (1, 5, None)]


@pytest.mark.parametrize("case,tol", [(c, 1e-10) for c in CASES], ids=[_ids(c) for c in CASES])
def test_logits_match_hf(case, tol):
    family, over = case
    model = tiny_model(family, **over)
    spec = describe(model)
    g = torch.Generator().manual_seed(1)
    for B, S, lengths in BATCHES:
        x = torch.randn(B, S, spec.hidden_size, generator=g, dtype=torch.float64)
        lens = torch.tensor(lengths) if lengths is not None else None
        full = lens if lens is not None else torch.full((B,), S)
        ref = _hf_logits(model, x, full)
        h = forward_hidden(spec, x, lens)
        assert h.shape == (B, S, spec.hidden_size)
        logits = torch.nn.functional.linear(h, spec.lm_head.weight, spec.lm_head.bias)
        err = _real_rows_err(logits, ref, full)
        assert err < tol, (family, over, B, S, err)


def test_padding_does_not_leak_into_real_rows():
    spec = describe(tiny_model("llama"))
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 9, spec.hidden_size, generator=g, dtype=torch.float64)
    h = forward_hidden(spec, x, torch.tensor([9, 4]))
    y = x.clone()
    y[1, 4:] = 1e3 * torch.randn(5, spec.hidden_size, generator=g, dtype=torch.float64)
    h2 = forward_hidden(spec, y, torch.tensor([9, 4]))
    assert torch.equal(h[:, :4], h2[:, :4]) and torch.equal(h[0], h2[0])
    assert not torch.allclose(h[1, 4:], h2[1, 4:])


@pytest.mark.parametrize("family,tol", [("llama", 1e-5), ("gpt2", 1e-5), ("gpt_neox", 1e-5)])
def test_float32_close_to_float64(family, tol):
    model = tiny_model(family)
    spec64 = describe(model)
    spec32 = describe(tiny_model(family, dtype=torch.float32))
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 13, spec64.hidden_size, generator=g, dtype=torch.float64)
    lens = torch.tensor([13, 6])
    ref = forward_hidden(spec64, x, lens)
    out = forward_hidden(spec32, x.float(), lens)
    assert out.dtype == torch.float32
    assert _real_rows_err(out, ref, lens) < tol


def test_gradients_reach_weights_and_inputs():
    model = tiny_model("gpt2")
    model.requires_grad_(True)
    spec = describe(model)
    x = torch.randn(2, 6, spec.hidden_size, dtype=torch.float64, requires_grad=True)
    forward_hidden(spec, x, torch.tensor([6, 3])).square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert model.transformer.h[0].attn.c_attn.weight.grad is not None
    assert model.transformer.wpe.weight.grad is not None


def test_sliding_window_limit():
    spec = describe(tiny_model("mistral", sliding_window=16))
    assert spec.max_positions == 16
    with pytest.raises(ValueError, match="max_positions"):
        forward_hidden(spec, torch.randn(1, 17, spec.hidden_size, dtype=torch.float64))
    spec = describe(tiny_model("qwen2", use_sliding_window=True, sliding_window=8, max_window_layers=1))
    assert spec.max_positions == 8


def test_qwen2_sliding_layers_match_hf_within_window():
    model = tiny_model("qwen2", use_sliding_window=True, sliding_window=8, max_window_layers=1)
    spec = describe(model)
    x = torch.randn(2, 8, spec.hidden_size, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    lens = torch.tensor([8, 3])
    ref = _hf_logits(model, x, lens)
    logits = torch.nn.functional.linear(forward_hidden(spec, x, lens), spec.lm_head.weight)
    assert _real_rows_err(logits, ref, lens) < 1e-10


@pytest.mark.parametrize("bad,match", [
    (lambda d: dict(inputs_embeds=torch.randn(2, 5, d + 1, dtype=torch.float64)), "inputs_embeds"),
    (lambda d: dict(inputs_embeds=torch.randn(5, d, dtype=torch.float64)), "inputs_embeds"),
    (lambda d: dict(inputs_embeds=torch.randn(2, 5, d)), "float32"),
    (lambda d: dict(inputs_embeds=torch.randn(2, 129, d, dtype=torch.float64)), "max_positions"),
    (lambda d: dict(inputs_embeds=torch.randn(2, 5, d, dtype=torch.float64), lengths=torch.tensor([5])), "lengths"),
    (lambda d: dict(inputs_embeds=torch.randn(2, 5, d, dtype=torch.float64), lengths=torch.tensor([5., 2.])),
     "lengths"),
    (lambda d: dict(inputs_embeds=torch.randn(2, 5, d, dtype=torch.float64), lengths=[5, 2]), "lengths"),
])
def test_bad_inputs(bad, match):
    spec = describe(tiny_model("gpt2"))
    with pytest.raises(ValueError, match=match):
        forward_hidden(spec, **bad(spec.hidden_size))
