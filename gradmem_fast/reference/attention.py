"""The reference's own attention: eager semantics, computed in the input dtype, twice differentiable.

Hugging Face's eager attention runs its softmax in float32 whatever the model's dtype, so a float64
model run through it is only float32-exact. The reference registers this function through
transformers' `AttentionInterface` (with the eager 4D additive mask through `AttentionMaskInterface`)
and switches a model to it where it needs eager semantics: a second-order write, whose inner
gradients must themselves be differentiable (SDPA's fused kernels cannot double-backward).
"""
import contextlib

import torch
from torch import nn

ATTENTION_NAME = "gradmem_reference"
_registered = False


def reference_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, softcap=None,
                        **kwargs):
    """query (B, Hq, S, D), key / value (B, Hkv, Skv, D), attention_mask additive (B, 1, S, Skv) or None.

    Returns (output (B, S, Hq, D), weights (B, Hq, S, Skv)), all in the query's dtype.
    """
    if kwargs.get("s_aux") is not None:
        raise NotImplementedError(f"{ATTENTION_NAME} attention does not implement attention sinks (s_aux)")
    groups = query.shape[1] // key.shape[1]
    if groups > 1:
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    scores = torch.matmul(query, key.transpose(-1, -2)) * scaling
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    if attention_mask is not None:
        scores = scores + attention_mask[..., : key.shape[-2]].to(scores.dtype)
    weights = torch.softmax(scores, dim=-1)
    weights = nn.functional.dropout(weights, p=dropout, training=module.training)
    output = torch.matmul(weights.to(value.dtype), value).transpose(1, 2).contiguous()
    return output, weights


def register():
    """Make ATTENTION_NAME a valid `attn_implementation` (idempotent)."""
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(ATTENTION_NAME, reference_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, eager_mask)
    _registered = True


@contextlib.contextmanager
def reference_attention_mode(model):
    """Temporarily run `model` with the reference attention; its own setting is restored afterwards."""
    register()
    previous = model.config._attn_implementation
    if previous == ATTENTION_NAME:
        yield
        return
    _set_attention(model, ATTENTION_NAME)
    try:
        yield
    finally:
        _set_attention(model, previous)


def _set_attention(model, implementation):
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(implementation)
    else:
        model.config._attn_implementation = implementation
