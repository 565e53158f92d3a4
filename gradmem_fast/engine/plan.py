"""Per-write constants: everything that does not depend on the memory, computed once per write.

Shapes: B samples, T context tokens (possibly padded up to a bucket), m memory rows, S = m + T,
d hidden size, H query heads, Hkv key/value heads, D head dim.
"""
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F

from .layers import Layer0Context, layer0_context


@dataclass
class Rope:
    cos_mem: torch.Tensor  # tables for positions 0..m-1
    sin_mem: torch.Tensor
    cos_all: torch.Tensor  # tables for positions 0..S-1
    sin_all: torch.Tensor


@dataclass
class Plan:
    spec: Any  # models.spec.ModelSpec
    ops: Any  # engine.ops.Ops
    B: int
    T: int
    m: int
    dtype: torch.dtype  # model dtype
    memory_dtype: torch.dtype
    proj_weight: Optional[torch.Tensor]  # memory_proj (d, d) or None
    proj_bias: Optional[torch.Tensor]
    head: torch.Tensor  # (V, d), model dtype
    ctx_lengths: torch.Tensor  # (B,) int32 real context tokens L_b
    full_lengths: torch.Tensor  # (B,) int32 m + L_b
    targets: torch.Tensor  # (B*T,) int64, 0 on padding
    row_weights: torch.Tensor  # (B*T,) fp32, 1/L_b on real rows, 0 on padding
    sample_weights: torch.Tensor  # (B, T) view of row_weights
    x_ctx: torch.Tensor  # (B, T, d) context input embeddings (+ positions)
    pos_mem: Optional[torch.Tensor]  # (m, d) learned positions of the memory rows, or None
    rope: Optional[Rope]
    layer0: Layer0Context
    loss_rows: torch.Tensor  # (B*T,) fp32 output buffer of the head
    grad_rows: torch.Tensor  # (B*T, d) output buffer of the head

    @property
    def S(self):
        return self.m + self.T


def build_plan(spec, ops, input_ids, attention_mask, m, memory_dtype, write_head=None, memory_proj=None):
    """input_ids (B, T) int64, attention_mask (B, T) of 0/1 right padded. No host synchronisation."""
    B, T = input_ids.shape
    device = input_ids.device
    dtype = spec.embedding.dtype
    mask = attention_mask.to(torch.int32)
    ctx_lengths = mask.sum(dim=1, dtype=torch.int32)
    full_lengths = ctx_lengths + m
    real = mask.bool()
    targets = torch.where(real, input_ids, torch.zeros_like(input_ids)).reshape(B * T)
    sample_weights = real.to(torch.float32) / ctx_lengths.to(torch.float32)[:, None]
    x_ctx = F.embedding(input_ids, spec.embedding)
    pos_mem = None
    if spec.position_embedding is not None:
        x_ctx = x_ctx + spec.position_embedding[m:m + T]
        pos_mem = spec.position_embedding[:m]
    rope = None
    if spec.rotary is not None:
        positions = torch.arange(m + T, device=device)
        cos_all, sin_all = ops.rotary_tables(spec.rotary, positions)
        cos_mem, sin_mem = ops.rotary_tables(spec.rotary, positions[:m])
        cos_ctx, sin_ctx = ops.rotary_tables(spec.rotary, positions[m:])
        rope = Rope(cos_mem, sin_mem, cos_all, sin_all)
        ctx_tables = (cos_ctx, sin_ctx)
    else:
        ctx_tables = None
    head = spec.lm_head.weight if write_head is None else write_head
    head = head.to(dtype)
    proj_weight = proj_bias = None
    if memory_proj is not None:
        proj_weight, proj_bias = memory_proj.weight, memory_proj.bias
    layer0 = layer0_context(spec, ops, x_ctx, ctx_lengths, ctx_tables)
    d = spec.hidden_size
    return Plan(spec=spec, ops=ops, B=B, T=T, m=m, dtype=dtype, memory_dtype=memory_dtype,
                proj_weight=proj_weight, proj_bias=proj_bias, head=head, ctx_lengths=ctx_lengths,
                full_lengths=full_lengths, targets=targets, row_weights=sample_weights.reshape(B * T),
                sample_weights=sample_weights, x_ctx=x_ctx, pos_mem=pos_mem, rope=rope, layer0=layer0,
                loss_rows=torch.empty(B * T, dtype=torch.float32, device=device),
                grad_rows=torch.empty(B * T, d, dtype=dtype, device=device))
