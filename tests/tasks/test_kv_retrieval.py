"""The key-value retrieval task: format, reproducibility, collate and the exact-match metric."""
import re

import pytest
import torch

from gradmem_fast.tasks import kv_retrieval as kv


def test_vocabulary():
    assert len(kv.VOCAB) == 3 + 62 + 4
    assert kv.VOCAB.pad_id == 0 and kv.VOCAB.tokens[0] == "<pad>"
    text = "!aZ:09!|?"
    assert kv.VOCAB.decode(kv.VOCAB.encode(text)) == text
    assert len(set(kv.VOCAB.symbol_ids)) == 62
    with pytest.raises(ValueError, match="'#'"):
        kv.VOCAB.encode("a#")


@pytest.mark.parametrize("pairs, key_len, value_len", [(1, 2, 2), (4, 2, 2), (8, 1, 3), (3, 3, 1)])
def test_sample_format(pairs, key_len, value_len):
    data = kv.KVRetrievalDataset(pairs, 50, key_len=key_len, value_len=value_len, seed=7)
    sym = "[a-zA-Z0-9]"
    for i in range(len(data)):
        context, query, target = data.text(i)
        assert len(context) == pairs * (key_len + value_len + 3) + 1
        assert re.fullmatch(f"(!{sym}{{{key_len}}}:{sym}{{{value_len}}}!){{{pairs}}}\\|", context)
        found = re.findall(f"!({sym}{{{key_len}}}):({sym}{{{value_len}}})!", context)
        keys = [k for k, _ in found]
        assert len(set(keys)) == pairs
        assert re.fullmatch(f"\\?!{sym}{{{key_len}}}:", query)
        asked = query[2:-1]
        assert target == dict(found)[asked] + "!|"
        item = data[i]
        assert kv.VOCAB.decode(item["context_ids"]) == context
        assert kv.VOCAB.decode(item["input_ids"]) == query + target
        assert item["labels"] == [-100] * len(query) + kv.VOCAB.encode(target)
        assert [item["input_ids"][p] for p in item["value_positions"]] == kv.VOCAB.encode(target[:value_len])


def test_seeded_and_reproducible():
    a = kv.KVRetrievalDataset(4, 20, seed=1)
    b = kv.KVRetrievalDataset(4, 20, seed=1)
    c = kv.KVRetrievalDataset(4, 20, seed=2)
    assert [a.text(i) for i in range(20)] == [b.text(i) for i in range(20)]
    assert [a.text(i) for i in range(20)] != [c.text(i) for i in range(20)]
    assert len({a.text(i) for i in range(20)}) == 20
    positions = {a.text(i)[0].index("!" + a.text(i)[1][2:]) // 7 for i in range(20)}
    assert len(positions) > 1  # the asked pair is not always at the same place


def test_collate_pads_right_with_ignored_labels():
    items = [kv.KVRetrievalDataset(n, 1, seed=n)[0] for n in (1, 3)]
    b = kv.collate(items)
    assert b["context_ids"].shape == (2, 22) and b["input_ids"].shape == (2, 9)
    assert b["context_mask"][0].tolist() == [1] * 8 + [0] * 14 and b["context_mask"][1].sum() == 22
    assert (b["context_ids"][0, 8:] == kv.PAD_ID).all()
    assert b["attention_mask"].all()
    assert (b["labels"][:, :5] == -100).all()
    assert torch.equal(b["labels"][:, 5:], b["input_ids"][:, 5:])
    short = dict(items[0], input_ids=items[0]["input_ids"][:7], labels=items[0]["labels"][:7])
    padded = kv.collate([short, items[1]])
    assert padded["labels"][0, 7:].tolist() == [-100, -100] and padded["attention_mask"][0, 7:].sum() == 0
    with pytest.raises(ValueError, match="empty"):
        kv.collate([])


def test_exact_match_needs_every_value_token():
    items = [kv.KVRetrievalDataset(2, 3, seed=0)[i] for i in range(3)]
    b = kv.collate(items)
    mask = kv.value_mask(items)
    assert mask.sum(dim=1).tolist() == [2, 2, 2] and mask[:, 5:7].all()
    V = len(kv.VOCAB)
    logits = torch.randn(3, 9, V)
    target = b["input_ids"]
    logits.scatter_(2, target.unsqueeze(-1), 100.0)  # every position right
    logits[1, 6, :] = 0.0
    logits[1, 6, (target[1, 6] + 1) % V] = 100.0  # sample 1: second value token wrong
    logits[2, 7, :] = 0.0
    logits[2, 7, (target[2, 7] + 1) % V] = 100.0  # sample 2: "!" wrong, not part of the value
    assert kv.exact_match(logits, b["labels"], mask).tolist() == [True, False, True]
    with pytest.raises(ValueError, match="agree"):
        kv.exact_match(logits[:, :-1], b["labels"], mask)
    with pytest.raises(ValueError, match="at least one position"):
        kv.exact_match(logits, b["labels"], torch.zeros_like(mask))


def test_chance_and_bad_arguments():
    assert kv.chance_exact_match(2) == pytest.approx(1 / 62 ** 2)
    for kwargs, match in [(dict(num_pairs=0, size=1), "num_pairs"), (dict(num_pairs=2, size=0), "size"),
                          (dict(num_pairs=2, size=1, key_len=0), "key_len"),
                          (dict(num_pairs=63, size=1, key_len=1), "distinct keys"),
                          (dict(num_pairs=2.0, size=1), "num_pairs")]:
        with pytest.raises(ValueError, match=match):
            kv.KVRetrievalDataset(**kwargs)
    with pytest.raises(IndexError):
        kv.KVRetrievalDataset(1, 3).text(3)
