"""read and memory_cache against a full recompute of [memory; query]."""
import copy

import pytest
import torch
from torch import nn

import gradmem_fast
from gradmem_fast.reference.read import cache_keyword
from helpers import FAMILIES, random_batch, rel_err, tiny_model

# SDPA is float64-exact on the CPU; Hugging Face's eager attention runs its softmax in float32, so
# through it a cached prefix or a padded batch differs from one full pass by about 1e-7.
EXACT = "sdpa"


def full_logits(model, memory, ids, proj=None):
    mem = proj(memory) if proj is not None else memory
    x = torch.cat([mem.expand(ids.shape[0], -1, -1), model.get_input_embeddings()(ids)], dim=1)
    return model(inputs_embeds=x).logits


@pytest.mark.parametrize("family", FAMILIES)
def test_read_matches_full_recompute(family):
    model = tiny_model(family, attn=EXACT)
    ids, mask, memory = random_batch(model, 2, 7, m=3, seed=1)
    memory = torch.stack([memory, -memory])
    logits = gradmem_fast.read(model, memory, ids)
    expected = full_logits(model, memory, ids)[:, 2:9]
    assert logits.shape == (2, 7, model.config.vocab_size)
    assert rel_err(logits, expected) < 1e-12


def test_read_ragged_mask_and_projection():
    model = tiny_model("llama", attn=EXACT)
    d = model.config.hidden_size
    ids, mask, memory = random_batch(model, 2, 6, lengths=[6, 3], m=2, seed=2)
    proj = nn.Linear(d, d).double()
    logits = gradmem_fast.read(model, memory, ids, mask, memory_proj=proj)
    for b, L in enumerate([6, 3]):
        expected = full_logits(model, memory, ids[b : b + 1, :L], proj)[0, 1 : 1 + L]
        assert rel_err(logits[b, :L], expected) < 1e-12


@pytest.mark.parametrize("family", FAMILIES)
def test_memory_cache_continues_from_memory(family):
    model = tiny_model(family, attn=EXACT)
    ids, _, memory = random_batch(model, 2, 5, m=4, seed=3)
    memory = torch.stack([memory, 0.5 * memory])
    cache = gradmem_fast.memory_cache(model, memory)
    assert cache.get_seq_length() == 4
    cached = model(input_ids=ids, **{cache_keyword(model): copy.deepcopy(cache)}).logits
    expected = full_logits(model, memory, ids)[:, 4:]
    assert rel_err(cached, expected) < 1e-12
    from_read = gradmem_fast.read(model, memory, ids)
    assert rel_err(cached[:, :-1], from_read[:, 1:]) < 1e-12


def test_memory_cache_generate():
    model = tiny_model("llama")
    ids, _, memory = random_batch(model, 1, 3, m=2, seed=4)
    cache = gradmem_fast.memory_cache(model, memory)
    mask = torch.ones(1, 2 + 3, dtype=torch.long)
    out = model.generate(input_ids=ids, attention_mask=mask, **{cache_keyword(model): cache}, max_new_tokens=3,
                         do_sample=False, pad_token_id=0)
    assert out.shape == (1, 6)
    x = full_logits(model, memory, ids)
    assert int(out[0, 3]) == int(x[0, -1].argmax())


def test_memory_cache_uses_the_installed_cache_name(capfd):
    import warnings

    from gradmem_fast.reference.read import cache_keyword

    model = tiny_model("gpt2")  # learned positions: no float32 rotary tables, so float64 agrees to rounding
    ids, _, memory = random_batch(model, 2, 4, m=3, seed=5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no deprecation warning from building or passing the cache
        cache = gradmem_fast.memory_cache(model, memory.expand(2, -1, -1))
        cached = model(input_ids=ids, **{cache_keyword(model): cache}).logits
    assert "deprecat" not in "".join(capfd.readouterr()).lower()
    assert cache_keyword(model) in ("cache", "past_key_values")
    expected = full_logits(model, memory, ids)[:, 3:]
    assert rel_err(cached, expected) < 1e-12
