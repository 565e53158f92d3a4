"""The standard cases match the performance guide's table; models build as the cases say."""
import os

import pytest
import torch

from gradmem_fast.benchmark import cases

# The "Standard cases" table of PERFORMANCE.md, verbatim.
TABLE = """
| gpt2-latency | GPT-2 small (12 layers, d 768, 12 heads, vocab 50257) | 1 | 512 | 16 | bf16 |
| gpt2-batch | GPT-2 small | 16 | 1008 | 16 | bf16 |
| llama1b-latency | Llama-3.2-1B shape (16 layers, d 2048, 32 heads, 8 kv heads, FFN 8192, vocab 128256, tied head) | 1 | 1024 | 16 | bf16 |
| llama1b-batch | Llama-3.2-1B shape | 8 | 2048 | 16 | bf16 |
| kv-paper | Llama, 4 layers, d 128, 4 heads, FFN 512, vocab 70 (the paper's KV-retrieval model) | 64 | 897 | 8 | fp32 |
| kv-latency | same | 1 | 897 | 8 | fp32 |
"""
CONFIG_OF = {"gpt2": "gpt2-small", "llama1b": "llama1b", "kv": "kv"}


def _rows(text):
    return [[cell.strip() for cell in line.strip().strip("|").split("|")]
            for line in text.strip().splitlines()]


def _performance_md():
    here = os.path.dirname(os.path.abspath(__file__))
    for path in (os.environ.get("GRADMEM_PERFORMANCE_MD"), os.path.join(here, "..", "..", "PERFORMANCE.md"),
                 os.path.join(here, "..", "..", "..", "shared", "PERFORMANCE.md")):
        if path and os.path.isfile(path):
            return path
    return None


def test_case_table_matches_the_guide():
    rows = _rows(TABLE)
    assert [r[0] for r in rows] == list(cases.CASE_NAMES)
    for row in rows:
        case = cases.get_case(row[0])
        assert (case.B, case.T, case.m, case.dtype, case.K) == (int(row[2]), int(row[3]), int(row[4]), row[5], 5)
        assert case.config == CONFIG_OF[row[0].split("-")[0]]


def test_table_copy_is_the_guides_table():
    path = _performance_md()
    if path is None:
        pytest.skip("PERFORMANCE.md not found (set GRADMEM_PERFORMANCE_MD)")
    with open(path) as f:
        text = f.read()
    section = text.split("## Standard cases", 1)[1].split("##", 1)[0]
    doc_rows = [r for r in _rows("\n".join(l for l in section.splitlines() if l.startswith("|")))
                if r[0] in cases.CASE_NAMES]
    assert doc_rows == _rows(TABLE)


@pytest.mark.parametrize("name, layers, d, heads, kv_heads, ffn, vocab, tied", [
    ("gpt2-small", 12, 768, 12, 12, 3072, 50257, True),
    ("llama1b", 16, 2048, 32, 8, 8192, 128256, True),
    ("kv", 4, 128, 4, 4, 512, 70, False),
])
def test_configs_have_the_named_shape(name, layers, d, heads, kv_heads, ffn, vocab, tied):
    c = cases.CONFIGS[name]()
    if c.model_type == "gpt2":
        got = (c.n_layer, c.n_embd, c.n_head, c.n_head, c.n_inner or 4 * c.n_embd, c.vocab_size)
    else:
        got = (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads,
               c.intermediate_size, c.vocab_size)
    assert got == (layers, d, heads, kv_heads, ffn, vocab)
    assert c.tie_word_embeddings == tied


def test_unknown_case_is_named():
    with pytest.raises(ValueError, match="gpt3-latency"):
        cases.get_case("gpt3-latency")


def test_resized_keeps_the_rest():
    case = cases.get_case("kv-paper").resized(T=40)
    assert (case.name, case.B, case.T, case.m, case.dtype) == ("kv-paper", 64, 40, 8, "fp32")


def test_kv_model_builds_frozen_with_sdpa():
    case = cases.get_case("kv-latency").resized(T=20)
    model = cases.build_model(case, "cpu", seed=3)
    assert model.config._attn_implementation == "sdpa"
    assert not model.training
    assert all(not p.requires_grad and p.dtype == torch.float32 for p in model.parameters())
    again = cases.build_model(case, "cpu", seed=3)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), again.parameters()))
    ids, memory = cases.make_inputs(case, "cpu", seed=1)
    assert ids.shape == (1, 20) and ids.dtype == torch.long and int(ids.max()) < 70
    assert memory.shape == (8, 128) and memory.dtype == torch.float32
    assert 0.01 < float(memory.std()) < 0.03
