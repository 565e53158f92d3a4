"""The plain loop computes the write of GRADMEM.md: compared with the reference writer in float64."""
import pytest
import torch

import gradmem_fast
from gradmem_fast.benchmark.plain_loop import compile_model, plain_write
from helpers import random_batch, rel_err, tiny_model


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("B, T, m, lengths", [(1, 9, 1, None), (3, 13, 4, [13, 5, 1])])
def test_plain_loop_matches_reference_writer(family, B, T, m, lengths):
    model = tiny_model(family, attn="sdpa")
    ids, mask, memory = random_batch(model, B, T, lengths=lengths, m=m, seed=B + T)
    got = plain_write(model, memory, ids, mask, steps=3, lr=0.7)
    want = gradmem_fast.write(model, memory, ids, mask, steps=3, lr=0.7, backend="reference")
    assert got.shape == (B, m, model.config.hidden_size)
    assert rel_err(got, want) < 1e-12
    assert rel_err(got, memory.expand_as(got)) > 1e-3  # the memory moved


def test_each_sample_gets_its_own_mean_loss_gradient():
    model = tiny_model("llama", attn="sdpa")
    ids, mask, memory = random_batch(model, 2, 11, lengths=[11, 6], m=3, seed=5)
    both = plain_write(model, memory, ids, mask, steps=2, lr=0.5)
    for b in range(2):
        one = plain_write(model, memory, ids[b:b + 1, : int(mask[b].sum())], steps=2, lr=0.5)
        assert rel_err(both[b:b + 1], one) < 1e-12


def test_one_step_is_minus_lr_times_the_loss_gradient():
    model = tiny_model("gpt2", attn="sdpa")
    ids, _, memory = random_batch(model, 1, 7, m=2, seed=9)
    memory.requires_grad_(True)
    inputs = torch.cat([memory, model.get_input_embeddings()(ids)[0]], dim=0)[None]
    logp = torch.log_softmax(model(inputs_embeds=inputs).logits[0, 1:8], dim=-1)  # rows m-1 .. m+T-2
    loss = -logp.gather(1, ids[0, :, None]).mean()
    (grad,) = torch.autograd.grad(loss, memory)
    got = plain_write(model, memory.detach(), ids, steps=1, lr=0.3)
    assert rel_err(got[0], memory.detach() - 0.3 * grad) < 1e-12


@pytest.mark.gpu
def test_compiled_loop_matches_plain_loop():
    model = tiny_model("llama", dtype=torch.float32, attn="sdpa").cuda()
    ids, _, memory = random_batch(model, 2, 33, m=4, seed=2, device="cuda")
    want = plain_write(model, memory, ids, steps=3, lr=0.5)
    forward = compile_model(model)
    for _ in range(3):  # cudagraph trees record on a later call than the first
        got = plain_write(model, memory, ids, steps=3, lr=0.5, forward=forward)
    torch._dynamo.reset()
    assert rel_err(got, want) < 1e-4
