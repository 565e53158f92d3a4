"""forward_hidden in fp16/bf16 against float64, within about 2x the error of the HF model in the
same dtype (both measured against the float64 computation with the same rounded weights)."""
import copy

import pytest
import torch

from gradmem_fast.models import describe
from gradmem_fast.models.forward import forward_hidden
from helpers import rel_err, tiny_model
from models.hf64 import hf_float64


def _errors(family, dtype, device, B=3, S=24):
    model = tiny_model(family, dtype=dtype).to(device)
    model64 = copy.deepcopy(model).to(torch.float64)
    g = torch.Generator().manual_seed(8)
    x64 = torch.randn(B, S, model.config.hidden_size, generator=g, dtype=torch.float64).to(device)
    x = x64.to(dtype)
    lens = torch.tensor([S, 1, S // 2], device=device)[:B]
    mask = (torch.arange(S, device=device)[None] < lens[:, None]).long()
    spec, spec64 = describe(model), describe(model64)
    with hf_float64(model64):
        ref = model64(inputs_embeds=x.double(), attention_mask=mask).logits
    hf = model(inputs_embeds=x, attention_mask=mask).logits
    ours = torch.nn.functional.linear(forward_hidden(spec, x, lens), spec.lm_head.weight)
    assert rel_err(torch.nn.functional.linear(forward_hidden(spec64, x.double(), lens),
                                              spec64.lm_head.weight)[0], ref[0]) < 1e-10

    def err(out):
        return max(rel_err(out[b, :L], ref[b, :L]) for b, L in enumerate(lens.tolist()))

    return err(ours), err(hf)


@pytest.mark.parametrize("family,dtype,factor", [
    ("llama", torch.float16, 2.0), ("gpt2", torch.float16, 2.0), ("gpt_neox", torch.float16, 2.0)])
def test_fp16_cpu_within_2x_of_hf(family, dtype, factor):
    ours, hf = _errors(family, dtype, "cpu")
    assert ours <= factor * hf, (ours, hf)


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "gpt2", "gpt_neox"])
@pytest.mark.parametrize("dtype,factor", [(torch.bfloat16, 2.0), (torch.float16, 2.0)])
def test_lowp_cuda_within_2x_of_hf(family, dtype, factor):
    ours, hf = _errors(family, dtype, "cuda")
    assert ours <= factor * hf, (ours, hf)


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neox"])
def test_float64_cuda_matches_cpu(family):
    model = tiny_model(family)
    spec_cpu = describe(model)
    spec_gpu = describe(copy.deepcopy(model).cuda())
    x = torch.randn(2, 11, spec_cpu.hidden_size, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    lens = torch.tensor([11, 4])
    ref = forward_hidden(spec_cpu, x, lens)
    out = forward_hidden(spec_gpu, x.cuda(), lens.cuda()).cpu()
    assert rel_err(out[0], ref[0]) < 1e-12 and rel_err(out[1, :4], ref[1, :4]) < 1e-12
