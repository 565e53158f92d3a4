"""gradmem_fast.generate against a greedy decode that recomputes [memory; query; generated] every step."""
import pytest
import torch
from torch import nn

import gradmem_fast
from gradmem_fast.generate import left_align
from helpers import FAMILIES, tiny_model

M = 4  # memory rows
NEW = 5  # new tokens per call
EXTRA_FAMILIES = ("opt", "phi")


def extra_model(family):
    """Tiny OPT and Phi (families the fast engine does not take; generate works on any causal LM)."""
    import transformers as tf

    torch.manual_seed(0)
    if family == "opt":
        config = tf.OPTConfig(hidden_size=32, num_hidden_layers=2, ffn_dim=48, num_attention_heads=4, vocab_size=61,
                              max_position_embeddings=64, word_embed_proj_dim=32, dropout=0.0,
                              attention_dropout=0.0, pad_token_id=1, bos_token_id=2, eos_token_id=2)
    else:
        config = tf.PhiConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                              vocab_size=61, max_position_embeddings=64, partial_rotary_factor=0.5,
                              resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0)
    config._attn_implementation = "eager"
    model = tf.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3) if p.dim() > 1 else p.add_(0.1 * torch.randn_like(p))
    model = model.double().eval()
    model.requires_grad_(False)
    return model


_models = {}


def model_of(family):
    if family not in _models:
        model = extra_model(family) if family in EXTRA_FAMILIES else tiny_model(family)
        model.generation_config.eos_token_id = None  # decode exactly NEW tokens, like the greedy loop
        model.generation_config.pad_token_id = 0
        _models[family] = model
    return _models[family]


def greedy_recompute(model, memory_b, ids_b, steps, memory_proj=None):
    """Greedy tokens for one unpadded query: the full [memory; query; generated] run from embeddings."""
    memory_in = memory_proj(memory_b) if memory_proj is not None else memory_b
    tokens = ids_b.tolist()
    for _ in range(steps):
        embeds = model.get_input_embeddings()(torch.tensor(tokens))
        x = torch.cat([memory_in, embeds], dim=0).unsqueeze(0)
        positions = torch.arange(x.shape[1]).unsqueeze(0)
        logits = model(inputs_embeds=x, position_ids=positions, use_cache=False).logits[0, -1]
        tokens.append(int(logits.argmax()))
    return tokens[ids_b.shape[0]:]


def query(model, B, T, lengths, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    for b, L in enumerate(lengths):
        mask[b, L:] = 0
    return ids, mask


def memory_of(model, shape, B, seed):
    g = torch.Generator().manual_seed(100 + seed)
    d = model.config.hidden_size
    rows = (B, M, d) if shape == "per_sample" else (M, d)
    memory = torch.randn(*rows, generator=g, dtype=torch.float64)
    return memory.unsqueeze(0) if shape == "shared_batched" else memory


def check_against_greedy(model, memory, ids, mask, memory_proj=None):
    out = gradmem_fast.generate(model, memory, ids, mask, memory_proj=memory_proj, max_new_tokens=NEW,
                                do_sample=False)
    B, T = ids.shape
    assert out.shape == (B, T + NEW)
    assert torch.equal(out[:, :T], ids)  # the query as given, then the new tokens
    for b in range(B):
        L = int(mask[b].sum()) if mask is not None else T
        memory_b = memory[b] if memory.dim() == 3 and memory.shape[0] == B else memory.reshape(M, -1)
        want = greedy_recompute(model, memory_b, ids[b, :L], NEW, memory_proj)
        assert out[b, T:].tolist() == want, f"sample {b} (length {L})"


# Tq = 1, Tq < m and Tq > m; padded rows need Tq >= 2
QUERIES = [(1, None), (M - 1, None), (M + 3, None), (M - 1, [M - 1, 1, 2]), (M + 3, [M + 3, 2, M + 1])]


@pytest.mark.parametrize("family", FAMILIES + EXTRA_FAMILIES)
@pytest.mark.parametrize("shape", ["shared", "shared_batched", "per_sample"])
def test_generate_matches_greedy_recompute(family, shape):
    model = model_of(family)
    for i, (T, lengths) in enumerate(QUERIES):
        B = 3
        ids, mask = query(model, B, T, lengths or [T] * B, seed=i)
        memory = memory_of(model, shape, B, seed=i)
        check_against_greedy(model, memory, ids, mask if lengths else None)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_generate_with_memory_projection(family):
    model = model_of(family)
    d = model.config.hidden_size
    torch.manual_seed(5)
    proj = nn.Linear(d, d).double()
    ids, mask = query(model, 2, 6, [6, 3], seed=7)
    check_against_greedy(model, memory_of(model, "shared", 2, seed=7), ids, mask, memory_proj=proj)


def test_generate_calls_do_not_share_state():
    model = model_of("llama")
    ids, _ = query(model, 2, 3, [3, 3], seed=8)
    memory = memory_of(model, "shared", 2, seed=8)
    first = gradmem_fast.generate(model, memory, ids, max_new_tokens=NEW, do_sample=False)
    second = gradmem_fast.generate(model, memory, ids, max_new_tokens=NEW, do_sample=False)
    assert torch.equal(first, second)
    other = gradmem_fast.generate(model, memory, ids[:, :2], max_new_tokens=NEW, do_sample=False)
    assert other[0, 2:].tolist() == greedy_recompute(model, memory, ids[0, :2], NEW)


def test_generate_dict_output_has_the_query_layout():
    model = model_of("qwen2")
    ids, mask = query(model, 2, 5, [5, 2], seed=9)
    memory = memory_of(model, "shared", 2, seed=9)
    out = gradmem_fast.generate(model, memory, ids, mask, max_new_tokens=3, do_sample=False,
                                return_dict_in_generate=True, output_scores=True)
    plain = gradmem_fast.generate(model, memory, ids, mask, max_new_tokens=3, do_sample=False)
    assert torch.equal(out.sequences, plain)
    assert len(out.scores) == 3
    assert torch.equal(out.scores[0].argmax(-1), plain[:, 5])


def test_left_align():
    ids = torch.tensor([[1, 2, 3, 9], [4, 5, 9, 9], [6, 9, 9, 9]])
    mask = (ids != 9).long()
    aligned, aligned_mask = left_align(ids, mask)
    assert aligned.tolist() == [[9, 1, 2, 3], [9, 9, 4, 5], [9, 9, 9, 6]]
    assert aligned_mask.tolist() == [[0, 1, 1, 1], [0, 0, 1, 1], [0, 0, 0, 1]]


def test_memory_cache_with_mask_drives_generate():
    """The documented way to drive model.generate yourself: a (B, m, d) cache and a (B, m + Tq) mask."""
    from gradmem_fast.reference.read import cache_keyword

    model = model_of("mistral")
    ids, _ = query(model, 2, 2, [2, 2], seed=10)
    memory = memory_of(model, "per_sample", 2, seed=10)
    cache = gradmem_fast.memory_cache(model, memory)
    mask = torch.ones(2, M + 2, dtype=torch.long)
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False,
                         **{cache_keyword(model): cache})
    for b in range(2):
        assert out[b, 2:].tolist() == greedy_recompute(model, memory[b], ids[b], NEW)


BAD_GENERATE = [
    (dict(generate_kwargs=dict(inputs_embeds=torch.zeros(2, 3, 32))), r"builds 'inputs_embeds'"),
    (dict(generate_kwargs=dict(past_key_values=None)), r"builds 'past_key_values'"),
    (dict(generate_kwargs=dict(cache=None)), r"builds 'cache'"),
    (dict(generate_kwargs=dict(num_beams=2)), r"num_beams=2 is not supported"),
    (dict(generate_kwargs=dict(num_return_sequences=3)), r"num_return_sequences=3"),
    (dict(memory=torch.zeros(3, M, 32, dtype=torch.float64)), r"memory batch 3 must be 1 or the batch size 2"),
    (dict(memory=torch.zeros(M, 31, dtype=torch.float64)), r"memory width 31"),
    (dict(input_ids=torch.full((2, 3), 61)), r"token id 61"),
    (dict(attention_mask=torch.tensor([[0, 1, 1], [1, 1, 1]])), r"sample 0 is not right-padded"),
    (dict(memory_proj=nn.Linear(32, 16)), r"memory_proj maps 32 -> 16"),
    (dict(generate_kwargs=dict(max_new_tokens=122)), r"4 \+ 3 \+ 122 = 129 exceeds the model's position limit 128"),
]


@pytest.mark.parametrize("changes,message", BAD_GENERATE, ids=[m for _, m in BAD_GENERATE])
def test_bad_generate_arguments(changes, message):
    model = model_of("gpt2")  # GPT-2: a position limit of 128 here
    args = dict(memory=memory_of(model, "shared", 2, seed=0), input_ids=query(model, 2, 3, [3, 3], seed=0)[0],
                attention_mask=None)
    changes = dict(changes)
    kwargs = changes.pop("generate_kwargs", {})
    args.update(changes)
    with pytest.raises(ValueError, match=message):
        gradmem_fast.generate(model, args["memory"], args["input_ids"], args["attention_mask"],
                              memory_proj=args.get("memory_proj"), **kwargs)
