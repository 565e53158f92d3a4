"""Backend choice: explicit reference, forced by environment, fallback warnings, explicit fast errors."""
import warnings

import pytest
import torch

import gradmem_fast
from gradmem_fast import dispatch
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
    monkeypatch.setattr(dispatch, "_warned", set())
    with pytest.warns(UserWarning, match="falls back to the reference backend: .*exceeds the model's limit 8"):
        out = gradmem_fast.write(model, memory, ids, mask, steps=1, lr=0.1, grad_mode="second")
    expected = gradmem_fast.reference.write(model, memory, ids, mask, steps=1, lr=0.1, grad_mode="second")
    assert torch.equal(out, expected)


def test_fallback_warns_once_per_reason(monkeypatch):
    model, ids, mask, memory = _sliding()
    monkeypatch.setattr(dispatch, "_warned", set())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            gradmem_fast.write(model, memory, ids, mask, steps=1, lr=0.1, grad_mode="second")
    assert sum("falls back" in str(w.message) for w in caught) == 1


def test_explicit_fast_raises_for_second_order_it_cannot_run():
    model, ids, mask, memory = _sliding()
    with pytest.raises(gradmem_fast.BackendUnavailable, match="sliding window"):
        gradmem_fast.write(model, memory, ids, mask, steps=1, lr=0.1, grad_mode="second", backend="fast")


def test_auto_takes_fast_engine_for_second_order(small, monkeypatch):
    from gradmem_fast.engine import fast_write

    model, ids, mask, memory = small
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the engine's ops use their PyTorch twins here
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = gradmem_fast.write(model, memory, ids, mask, steps=2, lr=0.3, grad_mode="second",
                                 second_order_steps=1)
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
    monkeypatch.setattr(dispatch, "_warned", set())
    with pytest.raises((gradmem_fast.BackendUnavailable, NotImplementedError)):
        gradmem_fast.write(model, memory, ids, steps=1, lr=0.1, backend="fast")
    with pytest.warns(UserWarning, match="falls back"):
        out = gradmem_fast.write(model, memory, ids, steps=1, lr=0.1)
    assert out.shape == (1, 2, 16) and torch.isfinite(out).all()


def test_sliding_window_beyond_limit_falls_back(monkeypatch):
    model = tiny_model("mistral", dtype=torch.float32, sliding_window=8)
    ids, mask, memory = random_batch(model, 1, 10, m=2)
    monkeypatch.setattr(dispatch, "_warned", set())
    with pytest.warns(UserWarning, match="exceeds the model's limit 8"):
        out = gradmem_fast.write(model, memory, ids, mask, steps=1, lr=0.1)
    expected = gradmem_fast.reference.write(model, memory, ids, mask, steps=1, lr=0.1)
    assert torch.equal(out, expected)
    with pytest.raises(gradmem_fast.BackendUnavailable, match="sliding window"):
        gradmem_fast.write(model, memory, ids, mask, steps=1, lr=0.1, backend="fast")


def test_auto_takes_fast_engine_without_warning(small, monkeypatch):
    from gradmem_fast.engine import fast_write

    model, ids, mask, memory = small
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the engine's ops use their PyTorch twins here
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = gradmem_fast.write(model, memory, ids, mask, steps=2, lr=0.3)
    expected = fast_write(model, memory.unsqueeze(0), ids, mask, steps=2, lr=0.3, write_head=None,
                          memory_proj=None, clip_value=None, clip_norm=None, grad_mode="none",
                          return_losses=False)
    assert torch.equal(out, expected)
