"""Associative key-value retrieval, generated on the fly (no download).

A sample holds N distinct keys, each with a value, written as the context

    !KK:VV!!KK:VV! ... !KK:VV!|          (7N + 1 tokens with keys and values of length 2)

and a query for one of the keys with its answer

    ?!KK:VV!|                            (query "?!KK:", target "VV!|")

The model writes the context into memory, then reads `query + target` from the memory alone with
teacher forcing: `labels` equal `input_ids` on the target and are -100 on the query. Exact match
asks for every value token right (the closing "!|" is not counted).

Characters: 62 symbols (a-z, A-Z, 0-9) for keys and values, the separators ! ? : | and the special
tokens below; one token per character.
"""
import random
import string

import torch

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>")
SYMBOLS = string.ascii_lowercase + string.ascii_uppercase + string.digits
SEPARATORS = "!?:|"
PAD_ID = 0
IGNORE_INDEX = -100


class CharVocab:
    """Special tokens first (pad = 0), then the 62 symbols, then the separators."""

    def __init__(self):
        self.tokens = list(SPECIAL_TOKENS) + list(SYMBOLS) + list(SEPARATORS)
        self.ids = {t: i for i, t in enumerate(self.tokens)}
        self.pad_id = PAD_ID
        self.symbol_ids = [self.ids[c] for c in SYMBOLS]

    def __len__(self):
        return len(self.tokens)

    def encode(self, text):
        try:
            return [self.ids[c] for c in text]
        except KeyError as exc:
            raise ValueError(f"character {exc.args[0]!r} is not in the vocabulary") from None

    def decode(self, ids):
        return "".join(self.tokens[int(i)] for i in ids if int(i) != self.pad_id)


VOCAB = CharVocab()


def _check_positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


class KVRetrievalDataset(torch.utils.data.Dataset):
    """`size` samples of `num_pairs` key-value pairs; sample i is the same for the same seed.

    Each item is a dict of lists: context_ids (7N + 1 with the default lengths), input_ids (query +
    target), labels (-100 on the query), value_positions (indices into input_ids of the value tokens).
    """

    def __init__(self, num_pairs, size, *, key_len=2, value_len=2, seed=0):
        for name, value in (("num_pairs", num_pairs), ("size", size), ("key_len", key_len),
                            ("value_len", value_len)):
            _check_positive_int(name, value)
        if num_pairs > len(SYMBOLS) ** key_len:
            raise ValueError(f"num_pairs {num_pairs} exceeds the {len(SYMBOLS) ** key_len} distinct keys "
                             f"of length {key_len}")
        self.num_pairs, self.size = num_pairs, size
        self.key_len, self.value_len, self.seed = key_len, value_len, seed

    def __len__(self):
        return self.size

    def text(self, index):
        """(context, query, target) strings of sample `index`."""
        if not 0 <= index < self.size:
            raise IndexError(f"sample {index} is outside [0, {self.size})")
        rng = random.Random(f"kv-{self.seed}-{index}")
        keys = set()
        while len(keys) < self.num_pairs:
            keys.add("".join(rng.choices(SYMBOLS, k=self.key_len)))
        keys = sorted(keys)
        rng.shuffle(keys)
        values = ["".join(rng.choices(SYMBOLS, k=self.value_len)) for _ in keys]
        asked = rng.randrange(self.num_pairs)
        context = "".join(f"!{k}:{v}!" for k, v in zip(keys, values)) + "|"
        return context, f"?!{keys[asked]}:", f"{values[asked]}!|"

    def __getitem__(self, index):
        context, query, target = self.text(index)
        query_ids, target_ids = VOCAB.encode(query), VOCAB.encode(target)
        return {
            "context_ids": VOCAB.encode(context),
            "input_ids": query_ids + target_ids,
            "labels": [IGNORE_INDEX] * len(query_ids) + target_ids,
            "value_positions": list(range(len(query_ids), len(query_ids) + self.value_len)),
        }


def _pad(rows, value):
    width = max(len(r) for r in rows)
    return torch.tensor([list(r) + [value] * (width - len(r)) for r in rows], dtype=torch.long)


def collate(items):
    """Right-padded batch: context_ids/context_mask (B, Tc), input_ids/attention_mask/labels (B, Tq).

    Padding takes the pad id in the ids, 0 in the masks and -100 in the labels. value_positions are
    not returned (the model's forward does not take them): use `value_mask` for the metric.
    """
    if not items:
        raise ValueError("collate needs at least one item, got an empty list")
    contexts = [it["context_ids"] for it in items]
    inputs = [it["input_ids"] for it in items]
    return {
        "context_ids": _pad(contexts, PAD_ID),
        "context_mask": _pad([[1] * len(c) for c in contexts], 0),
        "input_ids": _pad(inputs, PAD_ID),
        "attention_mask": _pad([[1] * len(q) for q in inputs], 0),
        "labels": _pad([it["labels"] for it in items], IGNORE_INDEX),
    }


def value_mask(items):
    """(B, Tq) bool: True at each sample's value tokens (the part exact match is about)."""
    width = max(len(it["input_ids"]) for it in items)
    mask = torch.zeros(len(items), width, dtype=torch.bool)
    for b, it in enumerate(items):
        mask[b, it["value_positions"]] = True
    return mask


def exact_match(logits, labels, mask):
    """Per-sample bool (B,): argmax of logits[:, i] equals labels[:, i] at every position in `mask`.

    logits (B, Tq, V) aligned with labels (B, Tq) as GradMemLM returns them; mask (B, Tq) bool.
    With teacher forcing this equals greedy decoding's exact match: greedy decoding keeps the
    correct prefix as long as every earlier value token is right.
    """
    if logits.shape[:2] != labels.shape or labels.shape != mask.shape:
        raise ValueError(f"logits {tuple(logits.shape)}, labels {tuple(labels.shape)} and mask "
                         f"{tuple(mask.shape)} must agree on (B, Tq)")
    if not mask.any(dim=1).all():
        raise ValueError("every sample needs at least one position in mask")
    right = logits.argmax(dim=-1) == labels
    return (right | ~mask).all(dim=1)


def chance_exact_match(value_len=2):
    """Exact match of a uniform guess over the 62 symbols for each value token."""
    return float(len(SYMBOLS)) ** -value_len
