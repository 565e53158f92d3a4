"""The fast engine (PyTorch twins of the ops) against the float64 reference write, in float32."""
import pytest
import torch

from engine_cases import cast, fast_kwargs, make_options, model_pair, write_both
from gradmem_fast.engine import fast_reason, fast_write
from helpers import FAMILIES, random_batch, rel_err

TOL_FP32 = 1e-4


def check(out, losses, ref, ref_losses, start, B, m, steps, tol=TOL_FP32):
    assert out.shape == (B, m, start.shape[-1]) and out.dtype == start.dtype
    assert losses.shape == (B, steps) and losses.dtype == torch.float32
    assert rel_err(out, ref) < tol
    if steps:
        assert rel_err(losses, ref_losses) < tol
        assert rel_err(ref, start.expand_as(ref)) > 1e-3  # the write moved the memory


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("B, T, lengths, m, steps", [
    (1, 7, None, 1, 1),
    (3, 11, [11, 5, 1], 4, 3),
    (2, 9, [3, 9], 32, 2),
])
def test_families_ragged(family, B, T, lengths, m, steps):
    out, losses, ref, ref_losses, start = write_both(family, B=B, T=T, lengths=lengths, m=m, steps=steps)
    check(out, losses, ref, ref_losses, start, B, m, steps)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("option_names", [("write_head",), ("memory_proj",), ("clip_value",), ("clip_norm",),
                                          ("write_head", "memory_proj", "clip_value", "clip_norm")])
def test_options(family, option_names):
    out, losses, ref, ref_losses, start = write_both(family, B=2, T=8, lengths=[8, 3], m=3, steps=2,
                                                     option_names=option_names, seed=2)
    check(out, losses, ref, ref_losses, start, 2, 3, 2)


def test_clipping_changes_the_result():
    plain = write_both("llama", B=2, T=8, m=3, steps=1, seed=2)[0]
    clipped = write_both("llama", B=2, T=8, m=3, steps=1, seed=2, option_names=("clip_norm",))[0]
    assert rel_err(clipped, plain) > 1e-3


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("steps", [0, 5])
def test_steps_and_per_sample_memory(family, steps):
    out, losses, ref, ref_losses, start = write_both(family, B=3, T=6, lengths=[6, 4, 2], m=5, steps=steps,
                                                     per_sample_memory=True, lr=0.3, seed=3)
    check(out, losses, ref, ref_losses, start, 3, 5, steps)


@pytest.mark.parametrize("m", [1, 2, 7, 16, 32])
def test_memory_sizes(m):
    out, losses, ref, ref_losses, start = write_both("gpt_neox", B=2, T=5, lengths=[5, 2], m=m, steps=2, seed=m)
    check(out, losses, ref, ref_losses, start, 2, m, 2)


@pytest.mark.parametrize("family", ["qwen2", "gpt_neox"])
def test_sequential_neox_and_biases(family):
    overrides = {"use_parallel_residual": False} if family == "gpt_neox" else {}
    out, losses, ref, ref_losses, start = write_both(family, B=2, T=7, lengths=[7, 4], m=3, steps=2, seed=4,
                                                     **overrides)
    check(out, losses, ref, ref_losses, start, 2, 3, 2)


def test_single_layer_model():
    out, losses, ref, ref_losses, start = write_both("llama", B=2, T=6, lengths=[6, 3], m=2, steps=2,
                                                     num_hidden_layers=1)
    check(out, losses, ref, ref_losses, start, 2, 2, 2)


@pytest.mark.parametrize("family", ["llama", "gpt_neox"])
def test_first_order_identity_gradient(family):
    model32, model64 = model_pair(family)
    ids, mask, memory = random_batch(model32, 3, 6, lengths=[6, 2, 4], m=2, seed=6)
    start = memory.clone().requires_grad_(True)
    out = fast_write(model32, start[None], ids, mask, steps=3, lr=0.4, grad_mode="first", return_losses=False,
                     op_backend="reference", **fast_kwargs({}))
    ref = __import__("gradmem_fast").reference.write(model64, memory.double(), ids, mask, steps=3, lr=0.4)
    assert out.requires_grad and rel_err(out.detach(), ref) < TOL_FP32
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(7))
    (out * weights).sum().backward()
    assert torch.allclose(start.grad, weights.sum(0), rtol=0, atol=1e-6)


def test_none_mode_is_detached():
    model32, _ = model_pair("gpt2")
    ids, mask, memory = random_batch(model32, 2, 5, m=2)
    memory.requires_grad_(True)
    out = fast_write(model32, memory[None], ids, mask, steps=1, lr=0.4, grad_mode="none", return_losses=False,
                     op_backend="reference", **fast_kwargs({}))
    assert not out.requires_grad and out.shape == (2, 2, 32)


def test_memory_dtype_differs_from_model():
    model32, model64 = model_pair("llama")
    ids, mask, memory = random_batch(model64, 2, 6, lengths=[6, 3], m=3, seed=8)
    options = make_options(model64, ("memory_proj",), seed=9)
    ref, ref_losses = __import__("gradmem_fast").reference.write(model32, memory, ids, mask, steps=2, lr=0.5,
                                                                 return_losses=True, **cast(options, torch.float32))
    out, losses = fast_write(model32, memory, ids, mask, steps=2, lr=0.5, grad_mode="none", return_losses=True,
                             op_backend="reference", **fast_kwargs(cast(options, torch.float32)))
    assert out.dtype == torch.float64
    assert rel_err(out, ref) < TOL_FP32 and rel_err(losses, ref_losses) < TOL_FP32


def test_second_order_is_taken():
    """The forward of a second-order write is the first-order write (its gradients: test_engine_second_order)."""
    model32, _ = model_pair("llama")
    ids, mask, memory = random_batch(model32, 1, 4, m=2)
    for mode in ("none", "first", "second"):
        assert fast_reason(model32, memory, write_head=None, memory_proj=None, grad_mode=mode) is None
    kw = dict(steps=2, lr=0.1, return_losses=True, op_backend="reference", **fast_kwargs({}))
    out, losses = fast_write(model32, memory[None], ids, mask, grad_mode="second", **kw)
    expected, expected_losses = fast_write(model32, memory[None], ids, mask, grad_mode="none", **kw)
    assert torch.equal(out, expected) and torch.equal(losses, expected_losses)


def test_bad_op_backend():
    model32, _ = model_pair("llama")
    ids, mask, memory = random_batch(model32, 1, 4, m=2)
    with pytest.raises(ValueError, match="fastest"):
        fast_write(model32, memory[None], ids, mask, steps=1, lr=0.1, grad_mode="none", return_losses=False,
                   op_backend="fastest", **fast_kwargs({}))


def test_unsupported_model_reason():
    model = torch.nn.Linear(4, 4)
    assert fast_reason(model, torch.zeros(2, 4), write_head=None, memory_proj=None, grad_mode="none")


@pytest.mark.parametrize("family", ["mistral", "gemma3_text"])
def test_sliding_window_limit_is_refused(family):
    model32, _ = model_pair(family, sliding_window=8)
    ids, mask, memory = random_batch(model32, 1, 6, m=3)
    reason = fast_reason(model32, memory, write_head=None, memory_proj=None, grad_mode="none", seq_len=9)
    assert reason is not None and "sliding window" in reason
    with pytest.raises(ValueError, match="sliding window"):
        fast_write(model32, memory[None], ids, mask, steps=1, lr=0.1, grad_mode="none", return_losses=False,
                   op_backend="reference", **fast_kwargs({}))
