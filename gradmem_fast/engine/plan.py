"""Per-write constants: everything that does not depend on the memory, computed once per write.

Shapes: B samples, T context tokens (possibly padded up to a bucket), m memory rows, S = m + T,
d hidden size, H query heads, Hkv key/value heads, D head dim.
"""
from dataclasses import dataclass, replace
from typing import Any, Optional

import torch
import torch.nn.functional as F

from ..models.forward import layer_rotary
from .layers import Layer0Context, layer0_context
from .sublayers import IN_PLACE_ATTENTION, down_linears, qk_norm_parts, qkv_linears


@dataclass
class Rope:
    """Rotary tables of one Rotary (per layer: plan.ropes): (cos, sin, rotary) as sublayers.qkv_forward takes."""
    rotary: Any  # models.spec.Rotary
    cos_mem: torch.Tensor  # tables for positions 0..m-1
    sin_mem: torch.Tensor
    cos_all: torch.Tensor  # tables for positions 0..S-1
    sin_all: torch.Tensor
    cos_ctx: torch.Tensor  # tables for positions m..S-1 (layer-0 context rows, once per write)
    sin_ctx: torch.Tensor

    @property
    def mem(self):
        return self.cos_mem, self.sin_mem, self.rotary

    @property
    def all(self):
        return self.cos_all, self.sin_all, self.rotary

    @property
    def ctx(self):
        return self.cos_ctx, self.sin_ctx, self.rotary


def _ropes(spec, ops, m, T, device):
    """Per layer, the Rope of its rotary (layer_rotary), or None; one set of tables per distinct Rotary."""
    positions = torch.arange(m + T, device=device)
    by_rotary = {}
    ropes = []
    for layer in spec.layers:
        rotary = layer_rotary(spec, layer)
        if rotary is not None and id(rotary) not in by_rotary:
            by_rotary[id(rotary)] = Rope(rotary, *ops.rotary_tables(rotary, positions[:m]),
                                         *ops.rotary_tables(rotary, positions),
                                         *ops.rotary_tables(rotary, positions[m:]))
        ropes.append(None if rotary is None else by_rotary[id(rotary)])
    return tuple(ropes)


def fold_norm_offsets(spec):
    """spec itself, or where a norm scales by (offset + w) (Gemma), a copy whose norms hold offset + w (made
    once per write, so the norm ops take plain weights; under autograd, offset + w is in the graph of w)."""
    def fold(norm):
        if norm is None or not norm.offset:
            return norm
        return replace(norm, weight=norm.weight + norm.offset, offset=0.0)

    names = ("attn_norm", "mlp_norm", "post_attn_norm", "post_mlp_norm", "q_norm", "k_norm")
    if not any(getattr(layer, n) is not None and getattr(layer, n).offset for layer in spec.layers for n in names) \
            and not spec.final_norm.offset:
        return spec
    layers = tuple(replace(layer, **{n: fold(getattr(layer, n)) for n in names}) for layer in spec.layers)
    return replace(spec, layers=layers, final_norm=fold(spec.final_norm))


@dataclass
class HeadRows:
    """The rows that reach the head + loss op: R of the B*T positions, real ones first.

    Row i of sample b (position p = b*T + i) is final-norm row b*S + m-1+i and predicts token i.
    With B == 1 the real rows are already first (right padding), so pos/index are None and the
    head reads and writes contiguous row ranges of the full buffers in place.
    """
    weight: torch.Tensor  # (V, d) model dtype
    R: int
    pos: Optional[torch.Tensor]  # (R,) int64 positions in [0, B*T)
    index: Optional[torch.Tensor]  # (R,) int64 final-norm rows in [0, B*S)
    targets: torch.Tensor  # (R,) int64
    weights: torch.Tensor  # (R,) fp32
    hidden: Optional[torch.Tensor]  # (R, d) gathered final-norm rows (B > 1)
    loss_rows: torch.Tensor  # (R,) fp32 head output
    grad_rows: torch.Tensor  # (R, d) head output
    loss_matrix: torch.Tensor  # (B, R) fp32: row weight where the head row belongs to sample b, else 0
    d_final: torch.Tensor  # (B*S, d) gradient of the final-norm output: zero outside the head rows


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
    ctx_lengths: torch.Tensor  # (B,) int32 real context tokens L_b
    full_lengths: torch.Tensor  # (B,) int32 m + L_b
    targets: torch.Tensor  # (B*T,) int64, 0 on padding
    row_weights: torch.Tensor  # (B*T,) fp32, 1/L_b on real rows, 0 on padding
    sample_weights: torch.Tensor  # (B, T) view of row_weights
    pos_mem: Optional[torch.Tensor]  # (m, d) learned positions of the memory rows, or None
    ropes: tuple  # per layer, its Rope or None
    qkv: tuple  # per layer, the q/k/v projection as one Linear (sublayers.qkv_linears)
    down: tuple  # per layer, the MLP down projection as the engine runs it (sublayers.down_linears)
    qk_norm: tuple  # per layer, the q/k RMS norm's launches (sublayers.qk_norm_parts), or None
    layer0: Layer0Context
    head: HeadRows
    attention: Any  # the attention sublayer layers.layer_forward runs (sublayers.IN_PLACE_ATTENTION)

    @property
    def S(self):
        return self.m + self.T


def real_first(real, R):
    """real (B*T,) bool -> the first R positions with the real ones first, each group in order (R,) int64.
    Counting sort by cumulative sums: no host synchronisation, capturable."""
    n = real.numel()
    cum_real = torch.cumsum(real, 0)
    dest = torch.where(real, cum_real - 1, cum_real[-1:] + torch.cumsum(~real, 0) - 1)
    order = torch.empty(n, dtype=torch.int64, device=real.device)
    order.scatter_(0, dest, torch.arange(n, device=real.device))
    return order[:R]


def head_rows(real, targets, row_weights, head, B, T, m, R):
    S, d, device = m + T, head.shape[1], head.device
    if B == 1:
        pos = index = hidden = None
        head_targets, head_weights = targets[:R], row_weights[:R]
        loss_matrix = head_weights.view(1, R)
        d_final = torch.zeros(S, d, dtype=head.dtype, device=device)
        loss_rows = torch.empty(R, dtype=torch.float32, device=device)
        grad_rows = d_final[m - 1:m - 1 + R]
    else:
        pos = real_first(real.reshape(B * T), R)
        index = pos // T * S + (pos % T + (m - 1))
        head_targets, head_weights = targets[pos], row_weights[pos]
        hidden = torch.empty(R, d, dtype=head.dtype, device=device)
        loss_matrix = torch.zeros(B, R, dtype=torch.float32, device=device)
        loss_matrix.scatter_(0, (pos // T)[None], head_weights[None])
        d_final = torch.zeros(B * S, d, dtype=head.dtype, device=device)
        loss_rows = torch.empty(R, dtype=torch.float32, device=device)
        grad_rows = torch.empty(R, d, dtype=head.dtype, device=device)
    return HeadRows(weight=head, R=R, pos=pos, index=index, targets=head_targets, weights=head_weights,
                    hidden=hidden, loss_rows=loss_rows, grad_rows=grad_rows, loss_matrix=loss_matrix,
                    d_final=d_final)


def build_plan(spec, ops, input_ids, attention_mask, m, memory_dtype, write_head=None, memory_proj=None,
               head_rows_count=None):
    """input_ids (B, T) int64, attention_mask (B, T) of 0/1 right padded. No host synchronisation.

    head_rows_count: R, how many of the B*T positions reach the head (real ones first); it must be at
    least the number of real tokens (sum of the mask), which is not checked. Default B*T.
    """
    spec = fold_norm_offsets(spec)
    B, T = input_ids.shape
    device = input_ids.device
    dtype = spec.embedding.dtype
    R = B * T if head_rows_count is None else int(head_rows_count)
    if not 1 <= R <= B * T:
        raise ValueError(f"head_rows_count must be in [1, B*T = {B * T}], got {head_rows_count}")
    mask = attention_mask.to(torch.int32)
    ctx_lengths = mask.sum(dim=1, dtype=torch.int32)
    full_lengths = ctx_lengths + m
    real = mask.bool()
    targets = torch.where(real, input_ids, torch.zeros_like(input_ids)).reshape(B * T)
    sample_weights = real.to(torch.float32) / ctx_lengths.to(torch.float32)[:, None]
    row_weights = sample_weights.reshape(B * T)
    x_ctx = F.embedding(input_ids, spec.embedding)
    if spec.embedding_scale is not None:
        x_ctx = x_ctx * spec.embedding_scale
    pos_mem = None
    if spec.position_embedding is not None:
        x_ctx = x_ctx + spec.position_embedding[m:m + T]
        pos_mem = spec.position_embedding[:m]
    ropes = _ropes(spec, ops, m, T, device)
    head = spec.lm_head.weight if write_head is None else write_head
    head = head.to(dtype)
    proj_weight = proj_bias = None
    if memory_proj is not None:
        proj_weight, proj_bias = memory_proj.weight, memory_proj.bias
    qkv, down, qk_norm = qkv_linears(spec), down_linears(spec), qk_norm_parts(spec)
    layer0 = layer0_context(spec, ops, qkv[0], down[0], qk_norm[0], x_ctx, ctx_lengths,
                            None if ropes[0] is None else ropes[0].ctx, m)
    return Plan(spec=spec, ops=ops, B=B, T=T, m=m, dtype=dtype, memory_dtype=memory_dtype,
                proj_weight=proj_weight, proj_bias=proj_bias, ctx_lengths=ctx_lengths, full_lengths=full_lengths,
                targets=targets, row_weights=row_weights, sample_weights=sample_weights, pos_mem=pos_mem,
                ropes=ropes, qkv=qkv, down=down, qk_norm=qk_norm, layer0=layer0,
                head=head_rows(real, targets, row_weights, head, B, T, m, R), attention=IN_PLACE_ATTENTION)
