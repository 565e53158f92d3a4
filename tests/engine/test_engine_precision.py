"""Half precision: the engine's error stays within 2x the reference writer's error in the same dtype,
both measured against a float64 reference, summed over several seeds (one tiny write is chaotic)."""
import pytest
import torch

import gradmem_fast
from engine_cases import WIDE, fast_kwargs
from gradmem_fast.engine import fast_write
from helpers import random_batch, rel_err, tiny_model

SEEDS = range(4)


def error_sums(family, dtype, device, op_backend, use_graphs=None, **overrides):
    """Summed over seeds: (reference update error, engine update error, reference loss error, engine loss
    error); the update is M_K - M_0, errors relative to the float64 write's."""
    model64 = tiny_model(family, dtype=torch.float64, **overrides).to(device)
    low = tiny_model(family, dtype=dtype, **overrides).to(device)
    sums = torch.zeros(4, dtype=torch.float64)
    for seed in SEEDS:
        ids, mask, memory = random_batch(model64, 2, 9, lengths=[9, 5], m=4, seed=seed, device=device)
        ref, ref_losses = gradmem_fast.reference.write(model64, memory, ids, mask, steps=2, lr=0.3,
                                                       return_losses=True)
        low_ref, low_losses = gradmem_fast.reference.write(low, memory.to(dtype), ids, mask, steps=2, lr=0.3,
                                                           return_losses=True)
        out, losses = fast_write(low, memory.to(dtype)[None], ids, mask, steps=2, lr=0.3, grad_mode="none",
                                 return_losses=True, op_backend=op_backend, use_graphs=use_graphs,
                                 **fast_kwargs({}))
        assert out.dtype == dtype
        sums += torch.tensor([rel_err(low_ref - memory, ref - memory), rel_err(out - memory, ref - memory),
                              rel_err(low_losses, ref_losses), rel_err(losses, ref_losses)], dtype=torch.float64)
    return sums.tolist()


@pytest.mark.parametrize("family, dtype, ratio", [
    ("llama", torch.float16, 2.0), ("gpt2", torch.float16, 2.0), ("gpt_neox", torch.float16, 2.0),
    ("qwen3", torch.float16, 2.0), ("olmo2", torch.float16, 2.0), ("phi3", torch.float16, 2.0),
    ("gemma3_text", torch.float16, 2.0),
])
def test_half_precision_cpu(family, dtype, ratio):
    ref_update, update, ref_loss, loss = error_sums(family, dtype, "cpu", "reference")
    assert update <= ratio * ref_update and loss <= ratio * ref_loss


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2", "gpt_neox", "qwen3", "olmo2", "phi3", "gemma3_text"])
@pytest.mark.parametrize("dtype, ratio", [(torch.bfloat16, 2.0), (torch.float16, 2.0)])
@pytest.mark.parametrize("use_graphs", [True, False])
def test_half_precision_gpu(family, dtype, ratio, use_graphs):
    ref_update, update, ref_loss, loss = error_sums(family, dtype, "cuda", "auto", use_graphs,
                                                      **WIDE.get(family, WIDE["llama"]))
    assert update <= ratio * ref_update and loss <= ratio * ref_loss
