"""Every bad input to the public API raises a ValueError that names the value."""
import math

import pytest
import torch
from torch import nn

import gradmem_fast
from helpers import random_batch, tiny_model


@pytest.fixture(scope="module")
def setup():
    model = tiny_model("gpt2")  # GPT-2: learned positions, a hard position limit of 128 here
    ids, mask, memory = random_batch(model, 2, 6, lengths=[6, 4], m=3)
    return model, ids, mask, memory


def write(setup, **changes):
    model, ids, mask, memory = setup
    args = dict(model=model, memory=memory, input_ids=ids, attention_mask=mask, steps=1, lr=0.1)
    args.update(changes)
    return gradmem_fast.write(**args)


def _linear(out_features, value, bias=True, bias_value=0.0):
    layer = nn.Linear(32, out_features, bias=bias).double()
    with torch.no_grad():
        layer.weight.fill_(value)
        if bias:
            layer.bias.fill_(bias_value)
    return layer


BAD_WRITES = [
    (dict(input_ids=torch.zeros(6, dtype=torch.long)), r"2-D integer tensor.*\(6,\)"),
    (dict(input_ids=torch.zeros(2, 6)), r"integer dtype, got torch.float32"),
    (dict(attention_mask=torch.ones(2, 5, dtype=torch.long)), r"attention_mask shape \(2, 5\) != input_ids shape \(2, 6\)"),
    (dict(attention_mask=torch.tensor([[1, 1, 0, 1, 1, 1], [1] * 6])), r"sample 0 is not right-padded"),
    (dict(attention_mask=torch.tensor([[1] * 6, [0] * 6])), r"sample 1 has no real token"),
    (dict(attention_mask=torch.full((2, 6), 2)), r"only 0 and 1"),
    (dict(memory=torch.zeros(3, 31, dtype=torch.float64)), r"memory width 31 != the model's hidden size 32"),
    (dict(memory=torch.zeros(3, 3, 32, dtype=torch.float64)), r"memory batch 3 must be 1 or the batch size 2"),
    (dict(memory=torch.full((3, 32), math.nan, dtype=torch.float64)), r"non-finite"),
    (dict(memory=torch.zeros(2, 2, 3, 32)), r"memory must have shape"),
    (dict(steps=-1), r"steps must be a non-negative int, got -1"),
    (dict(steps=2.0), r"steps must be a non-negative int, got 2.0"),
    (dict(lr=math.inf), r"lr must be finite, got inf"),
    (dict(lr="0.1"), r"lr must be a real number, got '0.1'"),
    (dict(input_ids=torch.full((2, 6), 61)), r"token id 61 in input_ids is outside \[0, 61\)"),
    (dict(input_ids=torch.full((2, 6), -1)), r"token id -1"),
    (dict(input_ids=torch.zeros(2, 126, dtype=torch.long), attention_mask=None), r"3 \+ 126 = 129 exceeds the model's position limit 128"),
    (dict(backend="cuda"), r"unknown backend 'cuda'"),
    (dict(grad_mode="third"), r"unknown grad_mode 'third'"),
    (dict(clip_norm=0.0), r"clip_norm must be positive, got 0.0"),
    (dict(clip_value=-1), r"clip_value must be positive, got -1"),
    (dict(write_head=torch.zeros(60, 32, dtype=torch.float64)), r"write_head shape \(60, 32\) != \(V, d\) = \(61, 32\)"),
    (dict(write_head=nn.Linear(32, 61).double()), r"bias-free"),
    (dict(memory_proj=nn.Linear(32, 16).double()), r"memory_proj maps 32 -> 16, expected 32 -> 32"),
    (dict(memory_proj=torch.eye(32)), r"memory_proj must be None or an nn.Linear"),
    (dict(write_head=torch.zeros(61, 32, dtype=torch.long)),
     r"write_head must be a floating-point tensor, got torch.int64"),
    (dict(write_head=torch.full((61, 32), math.nan, dtype=torch.float64)), r"write_head holds non-finite values"),
    (dict(write_head=_linear(61, math.inf, bias=False)), r"write_head holds non-finite values"),
    (dict(memory_proj=_linear(32, math.nan)), r"memory_proj.weight holds non-finite values"),
    (dict(memory_proj=_linear(32, 0.0, bias_value=-math.inf)), r"memory_proj.bias holds non-finite values"),
]


@pytest.mark.parametrize("changes,message", BAD_WRITES, ids=[m for _, m in BAD_WRITES])
def test_bad_write_arguments(setup, changes, message):
    with pytest.raises(ValueError, match=message):
        write(setup, **changes)


@pytest.mark.parametrize("changes,message", BAD_WRITES[:10] + BAD_WRITES[14:17])
def test_reference_validates_too(setup, changes, message):
    model, ids, mask, memory = setup
    args = dict(model=model, memory=memory, input_ids=ids, attention_mask=mask, steps=1, lr=0.1)
    args.update(changes)
    with pytest.raises(ValueError, match=message):
        gradmem_fast.reference.write(**args)


def test_device_mismatch(setup):
    model, ids, mask, memory = setup
    fake = torch.zeros(2, 6, dtype=torch.long, device="meta")
    with pytest.raises(ValueError, match=r"input_ids is on meta but the model is on cpu"):
        gradmem_fast.write(model, memory, fake, None, steps=1, lr=0.1)
    with pytest.raises(ValueError, match=r"memory is on meta but the model is on cpu"):
        gradmem_fast.write(model, memory.to("meta"), ids, mask, steps=1, lr=0.1)


def test_read_validates(setup):
    model, ids, mask, memory = setup
    with pytest.raises(ValueError, match=r"memory width 31"):
        gradmem_fast.read(model, torch.zeros(3, 31, dtype=torch.float64), ids)
    with pytest.raises(ValueError, match=r"sample 0 is not right-padded"):
        gradmem_fast.read(model, memory, ids, torch.tensor([[0, 1, 1, 1, 1, 1], [1] * 6]))
    with pytest.raises(ValueError, match=r"memory rows 129 exceed the model's position limit 128"):
        gradmem_fast.memory_cache(model, torch.zeros(129, 32, dtype=torch.float64))


@pytest.mark.parametrize("changes,message", BAD_WRITES[-5:], ids=[m for _, m in BAD_WRITES[-5:]])
def test_reference_and_fast_check_head_and_projection_values(setup, changes, message):
    for backend in ("reference", "fast"):
        with pytest.raises(ValueError, match=message):
            write(setup, backend=backend, **changes)


def test_generate_and_read_check_projection_values(setup):
    model, ids, mask, memory = setup
    with pytest.raises(ValueError, match=r"memory_proj.weight holds non-finite values"):
        gradmem_fast.read(model, memory, ids, mask, memory_proj=_linear(32, math.nan))
    with pytest.raises(ValueError, match=r"memory_proj.weight holds non-finite values"):
        gradmem_fast.generate(model, memory, ids, mask, memory_proj=_linear(32, math.nan), max_new_tokens=2)
