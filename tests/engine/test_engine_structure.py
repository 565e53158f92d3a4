"""What the engine computes once per write, padding of the context, and the graph cache bookkeeping."""
import collections

import pytest
import torch

import gradmem_fast.ops.attention as attention
from engine_cases import fast_kwargs, model_pair
from gradmem_fast.engine import fast_write, graphs
from helpers import random_batch, rel_err, tiny_model


def _run(model, ids, mask, memory, steps, **kw):
    return fast_write(model, memory[None], ids, mask, steps=steps, lr=0.5, grad_mode="none", return_losses=True,
                      op_backend="reference", **fast_kwargs(kw))


@pytest.mark.parametrize("family", ["llama", "gpt_neox"])
def test_layer0_context_work_once_per_write(family, monkeypatch):
    calls = collections.Counter()
    for name in ("context_attention_state", "memory_attention_forward", "memory_attention_backward",
                 "attention_forward", "attention_backward"):
        original = getattr(attention, name)

        def counted(*args, _name=name, _original=original, **kwargs):
            calls[_name] += 1
            return _original(*args, **kwargs)
        monkeypatch.setattr(attention, name, counted)
    model, _ = model_pair(family)
    ids, mask, memory = random_batch(model, 2, 6, lengths=[6, 3], m=3)
    steps, layers = 4, model.config.num_hidden_layers
    _run(model, ids, mask, memory, steps)
    assert calls == {"context_attention_state": 1, "memory_attention_forward": steps,
                     "memory_attention_backward": steps, "attention_forward": steps * (layers - 1),
                     "attention_backward": steps * (layers - 1)}


@pytest.mark.parametrize("family", ["gpt2", "qwen2", "gpt_neox"])
def test_padding_the_context_changes_nothing(family):
    """The graph path pads T up to a bucket with masked columns; the result must not move."""
    model, _ = model_pair(family)
    ids, mask, memory = random_batch(model, 2, 7, lengths=[7, 4], m=3, seed=3)
    Tb = graphs.bucket_length(7, 3)
    padded_ids = torch.cat([ids, torch.randint(0, model.config.vocab_size, (2, Tb - 7))], dim=1)
    padded_mask = torch.cat([mask, torch.zeros(2, Tb - 7, dtype=mask.dtype)], dim=1)
    out, losses = _run(model, ids, mask, memory, 3)
    padded_out, padded_losses = _run(model, padded_ids, padded_mask, memory, 3)
    assert rel_err(padded_out, out) < 1e-5 and rel_err(padded_losses, losses) < 1e-5


@pytest.mark.parametrize("T, m, limit, expected", [
    (1, 8, None, 16), (16, 8, None, 16), (17, 8, None, 32), (57, 8, None, 64), (65, 8, None, 128),
    (897, 8, None, 960), (1008, 16, None, 1024), (100, 16, 128, 112), (112, 16, 128, 112),
])
def test_bucket_length(T, m, limit, expected):
    assert graphs.bucket_length(T, m, limit) == expected


class _Model:
    pass


def test_graph_cache_is_lru_and_bounded(monkeypatch):
    monkeypatch.setenv(graphs.ENV_CACHE_SIZE, "2")
    cache = graphs.GraphCache()
    model = _Model()
    built = []

    def build(tag):
        def make():
            built.append(tag)
            return graphs.GraphEntry(model_ref=lambda: model, ids=None, mask=None, memory=None, lr=None,
                                     step_loss=None, prologue=None, step=None, plan=tag)
        return make

    assert cache.get("a", model, build("a")).plan == "a"
    assert cache.get("b", model, build("b")).plan == "b"
    assert cache.get("a", model, build("a2")).plan == "a"  # hit: "a" becomes the most recent
    cache.get("c", model, build("c"))  # evicts "b", the least recently used
    assert len(cache) == 2 and built == ["a", "b", "c"]
    cache.get("b", model, build("b2"))
    assert built[-1] == "b2" and cache.captures == 4


def test_graph_cache_ignores_a_different_model_with_the_same_key(monkeypatch):
    monkeypatch.setenv(graphs.ENV_CACHE_SIZE, "8")
    cache = graphs.GraphCache()
    first, second = _Model(), _Model()

    def entry(model, tag):
        return lambda: graphs.GraphEntry(model_ref=lambda: model, ids=None, mask=None, memory=None, lr=None,
                                         step_loss=None, prologue=None, step=None, plan=tag)

    cache.get("k", first, entry(first, 1))
    assert cache.get("k", second, entry(second, 2)).plan == 2


def test_graph_cache_size_zero_keeps_nothing(monkeypatch):
    monkeypatch.setenv(graphs.ENV_CACHE_SIZE, "0")
    cache = graphs.GraphCache()
    model = _Model()
    cache.get("k", model, lambda: graphs.GraphEntry(lambda: model, *([None] * 8)))
    assert len(cache) == 0


def test_spec_cache_follows_the_parameters():
    from gradmem_fast.engine.specs import spec_of

    model = tiny_model("llama", dtype=torch.float32)
    first, _ = spec_of(model)
    assert spec_of(model)[0] is first
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone(), requires_grad=False)
    second, _ = spec_of(model)
    assert second is not first and second.lm_head.weight is model.lm_head.weight


def test_fast_reason_for_non_models():
    from gradmem_fast.engine import fast_reason

    for thing in (object(), torch.nn.Linear(4, 4)):
        assert fast_reason(thing, torch.zeros(2, 4), write_head=None, memory_proj=None, grad_mode="none")


@pytest.mark.parametrize("real, total, expected", [
    (16384, 16384, 16384), (16128, 16384, 16384), (100, 16384, 2048), (2049, 16384, 4096),
    (7, 32, 32), (1, 512, 64), (65, 512, 128), (512, 512, 512),
])
def test_head_rows_bucket(real, total, expected):
    assert graphs.head_rows_bucket(real, total) == expected


def test_only_real_rows_reach_the_head(monkeypatch):
    """The eager write hands the head the real rows only (the mask's sum), not B*T rows."""
    import gradmem_fast.engine.write as write_mod

    seen = []
    original = write_mod.build_plan

    def spy(*args, head_rows_count=None, **kwargs):
        seen.append(head_rows_count)
        return original(*args, head_rows_count=head_rows_count, **kwargs)

    monkeypatch.setattr(write_mod, "build_plan", spy)
    model, _ = model_pair("llama")
    ids, mask, memory = random_batch(model, 3, 9, lengths=[9, 2, 5], m=2, seed=4)
    out, losses = _run(model, ids, mask, memory, 2)
    padded_ids = torch.cat([ids, torch.zeros(3, 4, dtype=ids.dtype)], dim=1)
    padded_mask = torch.cat([mask, torch.zeros(3, 4, dtype=mask.dtype)], dim=1)
    padded_out, padded_losses = _run(model, padded_ids, padded_mask, memory, 2)
    assert seen == [16, 16]
    assert rel_err(padded_out, out) < 1e-5 and rel_err(padded_losses, losses) < 1e-5
