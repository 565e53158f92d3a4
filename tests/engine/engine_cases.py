"""Shared setup for the engine tests: a write run by the fast engine and by the float64 reference."""
import copy
import dataclasses
import functools

import torch
from torch import nn

import gradmem_fast.ops.attention as attention
import gradmem_fast.ops.geglu as geglu
import gradmem_fast.ops.head_loss as head_loss
import gradmem_fast.ops.qk_norm as qk_norm
import gradmem_fast.reference
from gradmem_fast.engine import fast_write
from helpers import random_batch, tiny_model


WIDE = {  # head dim 16 so the attention kernels take the call
    "llama": dict(hidden_size=64, intermediate_size=96),
    "gpt2": dict(n_embd=64),
    "gpt_neox": dict(hidden_size=64, intermediate_size=96),
    "qwen3": dict(hidden_size=64, intermediate_size=96, head_dim=16),
    "olmo2": dict(hidden_size=64, intermediate_size=96),
    "phi3": dict(hidden_size=64, intermediate_size=96),
    "gemma3_text": dict(hidden_size=64, intermediate_size=96, head_dim=16),
}
# Gemma 3's released head dim, the widest the attention kernels take, at 2 query heads and 1 kv head
GEMMA3_HEAD_DIM_256 = dict(hidden_size=64, intermediate_size=96, num_attention_heads=2, num_key_value_heads=1,
                           head_dim=256)


@functools.lru_cache(maxsize=None)
def model_pair(family, seed=0, **overrides):
    """The same tiny model in float32 and in float64 (the float64 one is an exact upcast)."""
    overrides = dict(overrides)
    return (tiny_model(family, dtype=torch.float32, seed=seed, **overrides),
            tiny_model(family, dtype=torch.float64, seed=seed, **overrides))


@functools.lru_cache(maxsize=None)
def model_on(family, device, seed=0, **overrides):
    """The float32 model of model_pair on another device."""
    return copy.deepcopy(model_pair(family, seed=seed, **overrides)[0]).to(device)


def make_options(model, option_names, seed=5):
    """Options in float64; `cast(options, dtype)` gives the same values in another dtype."""
    d, V = model.config.hidden_size, model.config.vocab_size
    g = torch.Generator().manual_seed(seed)
    options = {}
    if "write_head" in option_names:
        options["write_head"] = 0.2 * torch.randn(V, d, generator=g, dtype=torch.float64)
    if "memory_proj" in option_names:
        proj = nn.Linear(d, d).double()
        with torch.no_grad():
            proj.weight.copy_(torch.eye(d, dtype=torch.float64) + 0.1 * torch.randn(d, d, generator=g,
                                                                                        dtype=torch.float64))
            proj.bias.copy_(0.1 * torch.randn(d, generator=g, dtype=torch.float64))
        proj.requires_grad_(False)
        options["memory_proj"] = proj
    if "clip_value" in option_names:
        options["clip_value"] = 0.02
    if "clip_norm" in option_names:
        options["clip_norm"] = 0.05
    return options


def cast(options, dtype, device="cpu"):
    out = dict(options)
    if "write_head" in out:
        out["write_head"] = out["write_head"].to(device, dtype)
    if "memory_proj" in out:
        proj = nn.Linear(out["memory_proj"].in_features, out["memory_proj"].out_features).to(device, dtype)
        with torch.no_grad():
            proj.weight.copy_(out["memory_proj"].weight)
            proj.bias.copy_(out["memory_proj"].bias)
        proj.requires_grad_(False)
        out["memory_proj"] = proj
    return out


def fast_kwargs(options):
    kw = dict(write_head=None, memory_proj=None, clip_value=None, clip_norm=None)
    kw.update(options)
    return kw


def write_both(family, *, B, T, lengths=None, m, steps, lr=0.5, option_names=(), per_sample_memory=False,
               op_backend="reference", seed=0, grad_mode="none", device="cpu", use_graphs=None, **overrides):
    """(fast fp32 memory, fast losses, reference fp64 memory, reference losses, fp32 start memory), all on
    the CPU; the fast write runs on `device`, the float64 reference on the CPU."""
    model32, model64 = model_pair(family, **overrides)
    fast_model = model32 if device == "cpu" else model_on(family, device, **overrides)
    ids, mask, memory = random_batch(model32, B, T, lengths=lengths, seed=seed, m=m)
    memory = memory[None]
    if per_sample_memory:
        g = torch.Generator().manual_seed(seed + 1)
        memory = memory + 0.1 * torch.randn(B, *memory.shape[1:], generator=g).to(memory.dtype)
    options = make_options(model64, option_names, seed=seed + 5)
    ref, ref_losses = gradmem_fast.reference.write(model64, memory.double(), ids, mask, steps=steps, lr=lr,
                                                   return_losses=True, **options)
    out, losses = fast_write(fast_model, memory.to(device), ids.to(device), mask.to(device), steps=steps, lr=lr,
                             grad_mode=grad_mode, return_losses=True, op_backend=op_backend, use_graphs=use_graphs,
                             **fast_kwargs(cast(options, torch.float32, device)))
    return out.cpu(), losses.cpu(), ref, ref_losses, memory


# the engine's ops that run as Triton kernels: {module: op names}
TRITON_OPS = {
    attention: ("attention_forward", "attention_backward", "context_attention_state", "memory_attention_forward",
                "memory_attention_backward"),
    head_loss: ("fused_head_loss",),
    qk_norm: ("qk_norm_forward", "qk_norm_backward"),
    geglu: ("geglu_forward", "geglu_backward"),
}


def refuse_twins(monkeypatch, ops_table):
    """ops_table {module: op names}: make each op's PyTorch twin (name + "_reference") raise, so a test of the
    kernels cannot silently pass on a fallback to the twins."""
    def refuse(name):
        def twin(*args, **kwargs):
            raise AssertionError(f"{name} fell back to its PyTorch twin")
        return twin

    for module, names in ops_table.items():
        for name in names:
            monkeypatch.setattr(module, name + "_reference", refuse(name))


def batch_with_memories(model, B, T, lengths, m, seed):
    """(ids, mask, memory (B, m, d)): a random batch with a distinct memory per sample."""
    ids, mask, memory = random_batch(model, B, T, lengths=lengths, seed=seed, m=m)
    g = torch.Generator().manual_seed(seed + 1)
    memory = (memory[None] + 0.1 * torch.randn(B, *memory.shape, generator=g).to(memory.dtype)).contiguous()
    return ids, mask, memory


def fake_cuda(value, mode, memo):
    """value (a tensor, or a spec dataclass / tuple holding tensors) with fake CUDA tensors in place of its
    tensors; a tensor met twice (a tied head) maps to one fake tensor. Call inside `mode`."""
    if isinstance(value, torch.Tensor):
        if id(value) not in memo:
            memo[id(value)] = mode.from_tensor(value).to("cuda")
        return memo[id(value)]
    if dataclasses.is_dataclass(value):
        return dataclasses.replace(value, **{f.name: fake_cuda(getattr(value, f.name), mode, memo)
                                             for f in dataclasses.fields(value)})
    if isinstance(value, tuple):
        return tuple(fake_cuda(v, mode, memo) for v in value)
    return value
