"""Argument checks shared by the public API. Each failure is a ValueError naming the value.

Checks run once per call (some read tensor values, which syncs the device once), never per step.
"""
import math
import numbers

import torch
from torch import nn

from .backends import WRITE_BACKENDS as BACKENDS

GRAD_MODES = ("none", "first", "second")


def model_device(model):
    return next(model.parameters()).device


def vocab_size(model):
    return model.get_input_embeddings().weight.shape[0]


def head_vocab_size(model):
    return model.get_output_embeddings().weight.shape[0]


def position_limit(model):
    """The hard position limit of models with learned absolute positions (GPT-2), else None."""
    if getattr(model.config, "model_type", None) == "gpt2":
        return int(model.config.n_positions)
    return None


def memory_rows(memory):
    """m for a memory of shape (..., m, d), 0 when it is not such a tensor (checked later)."""
    return memory.shape[-2] if isinstance(memory, torch.Tensor) and memory.dim() >= 2 else 0


def _same_device(name, tensor, device):
    if tensor.device != device:
        raise ValueError(f"{name} is on {tensor.device} but the model is on {device}")


def check_ids_and_mask(model, input_ids, attention_mask, m):
    """Validate the context (or query) and return the mask as a tensor of the ids' shape."""
    device = model_device(model)
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise ValueError(f"input_ids must be a 2-D integer tensor (B, T), got {shape}")
    if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
        raise ValueError(f"input_ids must have an integer dtype, got {input_ids.dtype}")
    B, T = input_ids.shape
    if B == 0 or T == 0:
        raise ValueError(f"input_ids must have at least one sample and one token, got shape {(B, T)}")
    _same_device("input_ids", input_ids, device)
    V = vocab_size(model)
    lo, hi = int(input_ids.min()), int(input_ids.max())
    if lo < 0 or hi >= V:
        bad = lo if lo < 0 else hi
        raise ValueError(f"token id {bad} in input_ids is outside [0, {V}) (the model's vocabulary)")
    limit = position_limit(model)
    if limit is not None and m + T > limit:
        raise ValueError(f"memory rows + tokens = {m} + {T} = {m + T} exceeds the model's position limit {limit}")
    if attention_mask is None:
        return torch.ones_like(input_ids, dtype=torch.long)
    if not isinstance(attention_mask, torch.Tensor):
        raise ValueError(f"attention_mask must be a tensor or None, got {type(attention_mask).__name__}")
    if tuple(attention_mask.shape) != (B, T):
        raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape {(B, T)}")
    _same_device("attention_mask", attention_mask, device)
    mask = attention_mask.long()
    if ((mask != 0) & (mask != 1)).any():
        raise ValueError("attention_mask must hold only 0 and 1")
    gap = (mask[:, 1:] > mask[:, :-1]).any(dim=1)
    if gap.any():
        b = int(gap.nonzero()[0, 0])
        raise ValueError(f"attention_mask of sample {b} is not right-padded (a 0 comes before a 1)")
    empty = mask.sum(dim=1) == 0
    if empty.any():
        b = int(empty.nonzero()[0, 0])
        raise ValueError(f"sample {b} has no real token (attention_mask is all 0)")
    return mask


def check_memory(model, memory, B):
    """Validate the memory and return it as (1 or B, m, d)."""
    if not isinstance(memory, torch.Tensor) or not memory.is_floating_point():
        what = memory.dtype if isinstance(memory, torch.Tensor) else type(memory).__name__
        raise ValueError(f"memory must be a floating-point tensor, got {what}")
    if memory.dim() == 2:
        memory = memory.unsqueeze(0)
    if memory.dim() != 3:
        raise ValueError(f"memory must have shape (m, d), (1, m, d) or (B, m, d), got {tuple(memory.shape)}")
    d = model.config.hidden_size
    if memory.shape[-1] != d:
        raise ValueError(f"memory width {memory.shape[-1]} != the model's hidden size {d}")
    if memory.shape[1] == 0:
        raise ValueError("memory must have at least one row (m >= 1), got m = 0")
    if memory.shape[0] not in (1, B):
        raise ValueError(f"memory batch {memory.shape[0]} must be 1 or the batch size {B}")
    _same_device("memory", memory, model_device(model))
    if not torch.isfinite(memory).all():
        raise ValueError("memory holds non-finite values (NaN or inf)")
    return memory


def check_memory_proj(model, memory_proj):
    if memory_proj is None:
        return
    d = model.config.hidden_size
    if not isinstance(memory_proj, nn.Linear):
        raise ValueError(f"memory_proj must be None or an nn.Linear({d}, {d}), got {type(memory_proj).__name__}")
    if (memory_proj.in_features, memory_proj.out_features) != (d, d):
        raise ValueError(
            f"memory_proj maps {memory_proj.in_features} -> {memory_proj.out_features}, expected {d} -> {d}")
    _same_device("memory_proj", memory_proj.weight, model_device(model))
    for part, tensor in (("weight", memory_proj.weight), ("bias", memory_proj.bias)):
        if tensor is not None:
            _check_finite_float(f"memory_proj.{part}", tensor)


def check_write_head(model, write_head):
    """Validate the write head and return its (V, d) weight tensor or None."""
    if write_head is None:
        return None
    if isinstance(write_head, nn.Linear):
        if write_head.bias is not None:
            raise ValueError("write_head must be a bias-free nn.Linear (its bias is not None)")
        weight = write_head.weight
    elif isinstance(write_head, torch.Tensor):
        weight = write_head
    else:
        raise ValueError(f"write_head must be None, a (V, d) tensor or an nn.Linear, got {type(write_head).__name__}")
    expected = (head_vocab_size(model), model.config.hidden_size)
    if tuple(weight.shape) != expected:
        raise ValueError(f"write_head shape {tuple(weight.shape)} != (V, d) = {expected}")
    _same_device("write_head", weight, model_device(model))
    _check_finite_float("write_head", weight)
    return weight


def _check_finite_float(name, tensor):
    """A parameter tensor must be floating point and hold no NaN or inf (either would poison the memory)."""
    if not tensor.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {tensor.dtype}")
    if not torch.isfinite(tensor).all():
        raise ValueError(f"{name} holds non-finite values (NaN or inf)")


def _check_real(name, value, positive=False):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a real number, got {value!r}")
    if not math.isfinite(float(value)):
        raise ValueError(f"{name} must be finite, got {value!r}")
    if positive and value <= 0:
        raise ValueError(f"{name} must be positive, got {value!r}")
    return float(value)


def check_options(steps, lr, clip_value, clip_norm, grad_mode, backend=None):
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 0:
        raise ValueError(f"steps must be a non-negative int, got {steps!r}")
    _check_real("lr", lr)
    if clip_value is not None:
        _check_real("clip_value", clip_value, positive=True)
    if clip_norm is not None:
        _check_real("clip_norm", clip_norm, positive=True)
    if grad_mode not in GRAD_MODES:
        raise ValueError(f"unknown grad_mode {grad_mode!r}; expected one of {GRAD_MODES}")
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")


def check_second_order_steps(second_order_steps, steps, grad_mode):
    """None (every step second order) or j in 0..steps (the last j steps), only with grad_mode 'second'."""
    if second_order_steps is None:
        return
    if grad_mode != "second":
        raise ValueError(f"second_order_steps={second_order_steps!r} needs grad_mode='second', got {grad_mode!r}")
    if isinstance(second_order_steps, bool) or not isinstance(second_order_steps, numbers.Integral):
        raise ValueError(f"second_order_steps must be None or an int, got {second_order_steps!r}")
    if not 0 <= second_order_steps <= steps:
        raise ValueError(f"second_order_steps={second_order_steps!r} is outside 0..steps = 0..{steps}")


def check_write(model, memory, input_ids, attention_mask, *, steps, lr, write_head, memory_proj, clip_value,
                clip_norm, grad_mode, backend=None, second_order_steps=None):
    """Every check of a write call. Returns (memory (1 or B, m, d), mask (B, T), write-head weight or None)."""
    check_options(steps, lr, clip_value, clip_norm, grad_mode, backend)
    check_second_order_steps(second_order_steps, steps, grad_mode)
    mask = check_ids_and_mask(model, input_ids, attention_mask, memory_rows(memory))
    memory = check_memory(model, memory, input_ids.shape[0])
    head = check_write_head(model, write_head)
    check_memory_proj(model, memory_proj)
    return memory, mask, head
