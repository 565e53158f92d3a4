"""The attention backward op and its written-out double backward, in float64: torch.autograd.gradcheck and
gradgradcheck, and agreement with autograd differentiating the plain formulas and the attention twins."""
import pytest
import torch

from gradmem_fast.ops import attention
from gradmem_fast.ops.attention_double_backward import (attention_backward_op, attention_double_backward_reference,
                                                         attention_op, attention_op_backward_reference,
                                                         attention_op_forward_reference)
from helpers import rel_err

# (B, S, Hq, Hkv, D, lengths)
SHAPES = [(1, 5, 2, 2, 3, [5]), (2, 7, 4, 2, 4, [7, 3]), (3, 4, 2, 1, 2, [4, 1, 2])]


def _inputs(B, S, Hq, Hkv, D, lengths, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_(True)

    return (rand(B, S, Hq, D), rand(B, S, Hkv, D), rand(B, S, Hkv, D), rand(B, S, Hq, D),
            torch.tensor(lengths, dtype=torch.int32))


@pytest.mark.parametrize("shape", SHAPES)
def test_gradcheck_of_the_backward_op(shape):
    q, k, v, do, lengths = _inputs(*shape)
    assert torch.autograd.gradcheck(lambda *x: attention_backward_op(*x, lengths, 0.7, backend="reference"),
                                    (q, k, v, do))


@pytest.mark.parametrize("shape", SHAPES)
def test_gradgradcheck_of_attention(shape):
    q, k, v, _, lengths = _inputs(*shape, seed=1)
    assert torch.autograd.gradgradcheck(lambda *x: attention_op(*x, lengths, 0.6, backend="reference"), (q, k, v))


@pytest.mark.parametrize("shape", SHAPES)
def test_double_backward_matches_autograd_of_the_twins(shape):
    q, k, v, do, lengths = _inputs(*shape, seed=2)
    g = torch.Generator().manual_seed(3)
    gq, gk, gv = (torch.randn(t.shape, generator=g, dtype=torch.float64) for t in (q, k, v))
    got = attention_double_backward_reference(q, k, v, do, lengths, 0.8, gq, gk, gv)
    # autograd through the ops module's backward twin, whose o and lse come from its forward twin
    o, lse = attention.attention_forward_reference(q, k, v, lengths, 0.8)
    grads = attention.attention_backward_reference(do, q, k, v, o, lse, lengths, 0.8)
    want = torch.autograd.grad(grads, (q, k, v, do), (gq, gk, gv))
    for a, b in zip(got, want):
        assert rel_err(a, b) < 1e-6  # the ops twins keep lse in float32 even for float64 inputs
    # autograd through this module's backward twin (all float64)
    want = torch.autograd.grad(attention_op_backward_reference(q, k, v, do, lengths, 0.8), (q, k, v, do), (gq, gk, gv))
    for a, b in zip(got, want):
        assert rel_err(a, b) < 1e-12


def test_twins_match_the_attention_op_twins():
    q, k, v, do, lengths = _inputs(2, 6, 4, 2, 4, [6, 2], seed=4)
    o, lse = attention.attention_forward_reference(q, k, v, lengths, 0.5)
    assert rel_err(attention_op_forward_reference(q, k, v, lengths, 0.5), o) < 1e-12
    for a, b in zip(attention_op_backward_reference(q, k, v, do, lengths, 0.5),
                    attention.attention_backward_reference(do, q, k, v, o, lse, lengths, 0.5)):
        assert rel_err(a, b) < 1e-6
    padded = attention_op_backward_reference(q, k, v, do, lengths, 0.5)[0][1, 2:]
    assert torch.equal(padded, torch.zeros_like(padded))  # rows beyond the length get nothing


@pytest.mark.parametrize("bad, match", [
    (dict(scale=0.0), "scale"), (dict(lengths=torch.ones(3, dtype=torch.int32)), "lengths"),
    (dict(k=torch.zeros(1, 5, 3, 3, dtype=torch.float64)), "multiple"), (dict(do=torch.zeros(1, 5, 2, 2)), "do")])
def test_bad_arguments(bad, match):
    q, k, v, do, lengths = _inputs(1, 5, 2, 2, 3, [5])
    args = dict(q=q, k=k, v=v, do=do, lengths=lengths, scale=0.5)
    args.update(bad)
    if "k" in bad:
        args["v"] = bad["k"]
    with pytest.raises(ValueError, match=match):
        attention_backward_op(**args)
