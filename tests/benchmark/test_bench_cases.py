"""The standard cases and targets match benchmarks/PERFORMANCE.md; models build as the cases say."""
import os

import pytest
import torch

from gradmem_fast.benchmark import cases, meta_cases, targets

CONFIG_OF = {"gpt2": "gpt2-small", "llama1b": "llama1b", "kv": "kv"}
PERFORMANCE_MD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "benchmarks",
                              "PERFORMANCE.md")


def _section(title):
    """The table rows of the section `## title` of benchmarks/PERFORMANCE.md, header and rule dropped."""
    with open(PERFORMANCE_MD) as f:
        text = f.read()
    section = text.split(f"## {title}", 1)[1].split("\n## ", 1)[0]
    rows = [[cell.strip() for cell in line.strip().strip("|").split("|")]
            for line in section.splitlines() if line.startswith("|")]
    return rows[2:]


def _number(cell):
    return None if cell == "-" else float(cell)


def test_case_table_matches_the_cases():
    rows = _section("Standard cases")
    assert [r[0] for r in rows] == list(cases.CASE_NAMES)
    for row in rows:
        case = cases.get_case(row[0])
        assert (case.B, case.T, case.m, case.dtype, case.K) == (int(row[2]), int(row[3]), int(row[4]), row[5], 5)
        assert case.config == CONFIG_OF[row[0].split("-")[0]]


def test_target_table_matches_the_data():
    rows = _section("Targets for the fast writer (same run, same card)")
    assert [r[0] for r in rows] == list(cases.CASE_NAMES)
    for row in rows:
        t = targets.get_target(row[0])
        assert [_number(c) for c in row[1:]] == [t.fast_over_floor_max, t.plain_over_fast_min,
                                                   t.compiled_over_fast_min, t.peak_over_plain_max]


def test_baseline_table_matches_the_data():
    rows = _section("The plain loop on an H200")
    assert {r[0]: tuple(_number(c) for c in r[1:]) for r in rows} == targets.PLAIN_LOOP_H200


def test_meta_tables_match_the_data():
    rows = _section("Meta-step cases")
    case_rows, target_rows = rows[:2], rows[4:]
    assert [r[0] for r in case_rows] == list(meta_cases.META_CASE_NAMES)
    for row in case_rows:
        c = meta_cases.get_meta_case(row[0])
        assert (c.B, c.T, c.m, c.K, c.query, c.answer, c.dtype) == tuple(int(v) for v in row[2:8]) + (row[8],)
    assert [r[0] for r in target_rows] == list(meta_cases.META_CASE_NAMES)
    for row in target_rows:
        t = targets.get_target(row[0])
        assert isinstance(t, targets.MetaTarget)
        assert [_number(v) for v in row[1:]] == [t.reference_over_fast_min, t.peak_over_reference_max,
                                                  t.peak_k8_over_k_max]
    assert "meta-gpt2 209 ms and 21.6 GB" in open(PERFORMANCE_MD).read()
    assert targets.REFERENCE_META_H200["meta-gpt2"] == (209.0, 21.6)


def test_meta_target_checks():
    entry = {"case": "meta-kv", "reference_over_fast": 4.0, "fast_peak_over_reference": 0.3,
             "fast_peak_k8_over_k": 1.05}
    assert targets.format_checks(entry) == ["meta-kv: reference_over_fast 4.00 (target >= 5) MISSED",
                                            "meta-kv: fast_peak_k8_over_k 1.05 (target <= 1.1) met"]


def test_target_checks_say_met_missed_and_unmeasured():
    entry = {"case": "gpt2-latency", "fast_over_floor": 2.5, "plain_over_fast": 10.0,
             "compiled_over_fast": None, "fast_peak_over_plain": 0.5}
    lines = targets.format_checks(entry)
    assert lines == ["gpt2-latency: fast_over_floor 2.50 (target <= 3) met",
                     "gpt2-latency: plain_over_fast 10.00 (target >= 12) MISSED",
                     "gpt2-latency: compiled_over_fast - (target >= 2) unmeasured",
                     "gpt2-latency: fast_peak_over_plain 0.50 (target <= 1) met"]
    assert targets.format_checks({"case": "not-a-case"}) == []


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
