"""Backend choice: explicit reference, forced by environment, fallback warnings, explicit fast errors."""
import warnings

import pytest
import torch

import gradmem_fast
from gradmem_fast import backends, dispatch
from helpers import random_batch, tiny_model


@pytest.fixture
def small():
    model = tiny_model("llama", dtype=torch.float32)
    ids, mask, memory = random_batch(model, 2, 5, m=2)
    return model, ids, mask, memory


def _sliding(T=10):
    model = tiny_model("mistral", dtype=torch.float32, sliding_window=8)
    ids, mask, memory = random_batch(model, 1, T, m=2)
    return model, ids, mask, memory


def test_second_order_falls_back_where_the_engine_cannot_run(monkeypatch):
    model, ids, mask, memory = _sliding()
    monkeypatch.setattr(backends, "_warned", set())
    with pytest.warns(UserWarning, match="falls back to the reference backend: .*exceeds the model's limit 8"):
        out = gradmem_fast.write(model, memory, ids, mask, steps=1, lr=0.1, grad_mode="second")
    expected = gradmem_fast.reference.write(model, memory, ids, mask, steps=1, lr=0.1, grad_mode="second")
    assert torch.equal(out, expected)


def test_fallback_warns_once_per_reason(monkeypatch):
    model, ids, mask, memory = _sliding()
    monkeypatch.setattr(backends, "_warned", set())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            gradmem_fast.write(model, memory, ids, mask, steps=1, lr=0.1, grad_mode="second")
    assert sum("falls back" in str(w.message) for w in caught) == 1


def test_explicit_fast_raises_for_second_order_it_cannot_run():
    model, ids, mask, memory = _sliding()
    with pytest.raises(gradmem_fast.BackendUnavailable, match="sliding window"):
        gradmem_fast.write(model, memory, ids, mask, steps=1, lr=0.1, grad_mode="second", backend="fast")


def test_fast_engine_takes_second_order(small, monkeypatch):
    from gradmem_fast.engine import fast_write

    model, ids, mask, memory = small
    choice = gradmem_fast.explain(model, memory, ids, mask, grad_mode="second")
    assert choice.blockers == ()  # on CPU auto prefers the reference, but nothing blocks the engine
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the engine's ops use their PyTorch twins here
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = gradmem_fast.write(model, memory, ids, mask, steps=2, lr=0.3, grad_mode="second",
                                 second_order_steps=1, backend="fast")
    expected = fast_write(model, memory.unsqueeze(0), ids, mask, steps=2, lr=0.3, write_head=None,
                          memory_proj=None, clip_value=None, clip_norm=None, grad_mode="none",
                          return_losses=False)
    assert torch.equal(out, expected)


def test_environment_forces_backend(small, monkeypatch):
    model, ids, mask, memory = small
    monkeypatch.setenv(dispatch.ENV_BACKEND, "reference")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # forced reference: no fallback warning
        out = gradmem_fast.write(model, memory, ids, mask, steps=1, lr=0.1, grad_mode="second", backend="fast")
    assert out.shape == (2, 2, model.config.hidden_size)
    monkeypatch.setenv(dispatch.ENV_BACKEND, "turbo")
    with pytest.raises(ValueError, match="GRADMEM_FAST_BACKEND='turbo'"):
        gradmem_fast.write(model, memory, ids, mask, steps=1, lr=0.1)


def test_unsupported_model_falls_back(monkeypatch):
    import transformers

    config = transformers.OPTConfig(hidden_size=16, num_hidden_layers=1, ffn_dim=32, num_attention_heads=2,
                                    vocab_size=40, max_position_embeddings=64, word_embed_proj_dim=16)
    torch.manual_seed(0)
    model = transformers.OPTForCausalLM(config).eval()
    model.requires_grad_(False)
    ids = torch.randint(0, 40, (1, 5))
    memory = 0.1 * torch.randn(2, 16)
    monkeypatch.setattr(backends, "_warned", set())
    with pytest.raises((gradmem_fast.BackendUnavailable, NotImplementedError)):
        gradmem_fast.write(model, memory, ids, steps=1, lr=0.1, backend="fast")
    with pytest.warns(UserWarning, match="falls back"):
        out = gradmem_fast.write(model, memory, ids, steps=1, lr=0.1)
    assert out.shape == (1, 2, 16) and torch.isfinite(out).all()


def test_sliding_window_beyond_limit_falls_back(monkeypatch):
    model = tiny_model("mistral", dtype=torch.float32, sliding_window=8)
    ids, mask, memory = random_batch(model, 1, 10, m=2)
    monkeypatch.setattr(backends, "_warned", set())
    with pytest.warns(UserWarning, match="exceeds the model's limit 8"):
        out = gradmem_fast.write(model, memory, ids, mask, steps=1, lr=0.1)
    expected = gradmem_fast.reference.write(model, memory, ids, mask, steps=1, lr=0.1)
    assert torch.equal(out, expected)
    with pytest.raises(gradmem_fast.BackendUnavailable, match="sliding window"):
        gradmem_fast.write(model, memory, ids, mask, steps=1, lr=0.1, backend="fast")


def test_auto_takes_reference_on_cpu_without_warning(small):
    model, ids, mask, memory = small
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = gradmem_fast.write(model, memory, ids, mask, steps=2, lr=0.3)
    expected = gradmem_fast.reference.write(model, memory, ids, mask, steps=2, lr=0.3)
    assert torch.equal(out, expected)
    choice = gradmem_fast.explain(model, memory, ids, mask)
    assert (choice.backend, choice.blockers) == ("reference", ())
    assert "PyTorch twins" in choice.preference and "PyTorch twins" in str(choice)
    assert gradmem_fast.explain(model, memory, ids, mask, backend="fast").backend == "fast"
    assert gradmem_fast.explain(model, memory, ids, mask, backend="reference").preference is None


def test_auto_takes_fast_engine_where_preferred(small, monkeypatch):
    from gradmem_fast.engine import fast_write

    model, ids, mask, memory = small
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the engine's ops use their PyTorch twins here
    monkeypatch.setattr(dispatch, "device_preference", lambda model: None)  # as on a CUDA device
    assert gradmem_fast.explain(model, memory, ids, mask).backend == "fast"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = gradmem_fast.write(model, memory, ids, mask, steps=2, lr=0.3)
    expected = fast_write(model, memory.unsqueeze(0), ids, mask, steps=2, lr=0.3, write_head=None,
                          memory_proj=None, clip_value=None, clip_norm=None, grad_mode="none",
                          return_losses=False)
    assert torch.equal(out, expected)


def test_explain_names_blockers(small):
    _, ids, mask, memory = small
    model = tiny_model("llama", dtype=torch.float32, attention_dropout=0.3).train()
    choice = gradmem_fast.explain(model, memory, ids, mask)
    assert choice.backend == "reference" and any("dropout" in b for b in choice.blockers)
    assert "cannot take this call" in str(choice)
    with pytest.raises(ValueError, match="unknown backend 'gpu'"):
        gradmem_fast.explain(model, memory, ids, mask, backend="gpu")


@pytest.mark.parametrize("family,key", [("llama", "attention_dropout"), ("gpt2", "resid_pdrop"),
                                        ("gpt_neox", "hidden_dropout")])
def test_training_with_dropout_falls_back(family, key, monkeypatch):
    model = tiny_model(family, dtype=torch.float32, **{key: 0.3})
    ids, mask, memory = random_batch(model, 2, 5, m=2)
    assert dispatch.dropout_reason(model) is None  # eval mode: dropout is off
    model.train()
    monkeypatch.setattr(backends, "_warned", set())
    monkeypatch.setattr(dispatch, "device_preference", lambda model: None)  # auto would take the engine
    with pytest.warns(UserWarning, match=f"training mode with dropout .*{key}=0.3"):
        torch.manual_seed(1)
        out = gradmem_fast.write(model, memory, ids, mask, steps=1, lr=0.5)
    torch.manual_seed(1)
    expected = gradmem_fast.reference.write(model, memory, ids, mask, steps=1, lr=0.5)
    assert torch.equal(out, expected)  # the reference, dropout applied with the same random draws
    with pytest.raises(gradmem_fast.BackendUnavailable, match="dropout"):
        gradmem_fast.write(model, memory, ids, mask, steps=1, lr=0.5, backend="fast")


def test_training_without_dropout_and_single_dropout_module():
    model = tiny_model("gpt2", dtype=torch.float32)  # every dropout probability 0
    model.train()
    assert dispatch.dropout_reason(model) is None
    model = tiny_model("gpt2", dtype=torch.float32, resid_pdrop=0.2)
    model.transformer.h[1].attn.resid_dropout.train()  # the rest stays in eval mode
    reason = dispatch.dropout_reason(model)
    assert reason is not None and "transformer.h.1.attn.resid_dropout = Dropout(p=0.2)" in reason
    assert "config" not in reason  # model.training is False: the config alone does not count


def _half_attention(module, query, key, value, attention_mask, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    out, weights = sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    return 0.5 * out, weights


def test_custom_attention_falls_back(monkeypatch):
    from transformers import AttentionInterface

    from gradmem_fast.engine import fast_write

    monkeypatch.setitem(AttentionInterface._global_mapping, "half_sdpa", _half_attention)
    model = tiny_model("llama", dtype=torch.float32, attn="half_sdpa")
    ids, mask, memory = random_batch(model, 2, 6, lengths=[6, 4], m=2)
    monkeypatch.setattr(backends, "_warned", set())
    monkeypatch.setattr(dispatch, "device_preference", lambda model: None)
    with pytest.warns(UserWarning, match="attention implementation 'half_sdpa' is not one of the built-in"):
        out = gradmem_fast.write(model, memory, ids, mask, steps=2, lr=0.5)
    expected = gradmem_fast.reference.write(model, memory, ids, mask, steps=2, lr=0.5)
    assert torch.equal(out, expected)
    engine = fast_write(model, memory[None], ids, mask, steps=2, lr=0.5, write_head=None, memory_proj=None,
                        clip_value=None, clip_norm=None, grad_mode="none", return_losses=False,
                        op_backend="reference")
    update = (expected - memory).abs().max()
    assert (engine - expected).abs().max() > 0.05 * update  # the engine would have given another memory
    with pytest.raises(gradmem_fast.BackendUnavailable, match="half_sdpa"):
        gradmem_fast.write(model, memory, ids, mask, steps=1, lr=0.5, backend="fast")


def test_builtin_attention_replaced_is_caught(monkeypatch):
    from transformers import AttentionInterface

    for attn in ("eager", "sdpa"):
        assert dispatch.attention_reason(tiny_model("llama", dtype=torch.float32, attn=attn)) is None
    model = tiny_model("llama", dtype=torch.float32, attn="sdpa")
    monkeypatch.setitem(AttentionInterface._global_mapping, "sdpa", _half_attention)
    assert "not transformers' own function" in dispatch.attention_reason(model)
    monkeypatch.setitem(AttentionInterface._global_mapping, "eager", _half_attention)
    eager = tiny_model("llama", dtype=torch.float32, attn="eager")
    assert "'eager' is replaced" in dispatch.attention_reason(eager)
