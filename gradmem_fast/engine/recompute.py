"""One write step recomputed with the ops' PyTorch twins under autograd: the step's loss and its gradient
g(M) = grad_M sum_b L_b(M) as differentiable functions of the memory and of every weight (second_order.md).

The engine's hand-written backward (layers.py, in the out-of-place form of recompute_layers.py) runs on
the twins, whose backward formulas are plain torch ops, so its output g is a graph that autograd
differentiates once more (reverse over reverse). What the fast step caches per write (the layer-0 context rows' norm, q/k/v,
rotary and context-over-context attention, the fused q/k/v weights, the folded biases) depends on the
weights, so here it is recomputed inside the step's graph: layer 0 runs as a full layer over all rows.

Shapes: B samples, T context tokens, m memory rows, S = m + T, d hidden size.
"""
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Optional

import torch
import torch.nn.functional as F

from ..models import describe
from ..ops.head_loss import fused_head_loss_reference
from ..ops.memory_update import memory_update__reference
from .sublayers import down_linears, qkv_linears
from .recompute_layers import layer_backward, layer_forward
from .ops import ops_for

TWINS = ops_for("reference")


@dataclass
class StepConstants:
    """What one write's steps share and no weight changes: built once per write, without a graph."""
    input_ids: torch.Tensor  # (B, T) int64
    targets: torch.Tensor  # (B*T,) int64, 0 on padding
    row_weights: torch.Tensor  # (B*T,) float32, 1/L_b on real rows, 0 on padding
    full_lengths: torch.Tensor  # (B,) int32, m + L_b
    m: int
    memory_dtype: torch.dtype
    write_head: Optional[torch.Tensor]  # (V, d) or None (the LM head)
    memory_proj: Optional[torch.nn.Linear]
    clip_value: Optional[float]
    clip_norm: Optional[float]
    lr: torch.Tensor  # () float32


def step_constants(input_ids, attention_mask, m, memory_dtype, lr, write_head, memory_proj, clip_value,
                   clip_norm):
    mask = attention_mask.to(torch.int32)
    lengths = mask.sum(dim=1, dtype=torch.int32)
    real = mask.bool()
    targets = torch.where(real, input_ids, torch.zeros_like(input_ids)).reshape(-1)
    row_weights = (real.to(torch.float32) / lengths.to(torch.float32)[:, None]).reshape(-1)
    return StepConstants(input_ids=input_ids, targets=targets, row_weights=row_weights, full_lengths=lengths + m,
                         m=m, memory_dtype=memory_dtype, write_head=write_head, memory_proj=memory_proj,
                         clip_value=clip_value, clip_norm=clip_norm,
                         lr=torch.full((), lr, dtype=torch.float32, device=input_ids.device))


def layer_plan(model, consts):
    """The part of an engine plan that layers.layer_forward / layer_backward read, built from the model's
    parameters under the current grad mode (so the fused q/k/v weights and folded biases are in the graph)."""
    spec = describe(model)
    rope = None
    if spec.rotary is not None:
        positions = torch.arange(consts.m + consts.input_ids.shape[1], device=consts.input_ids.device)
        cos_all, sin_all = TWINS.rotary_tables(spec.rotary, positions)
        rope = SimpleNamespace(cos_all=cos_all, sin_all=sin_all)
    return SimpleNamespace(spec=spec, ops=TWINS, qkv=qkv_linears(spec), down=down_linears(spec),
                           full_lengths=consts.full_lengths, rope=rope)


def _memory_rows(plan, consts, memory):
    """memory (B, m, d) -> the rows entering the model (B, m, d), model dtype, positions added."""
    spec, x = plan.spec, memory
    proj = consts.memory_proj
    if proj is not None:
        x = F.linear(x.to(proj.weight.dtype), proj.weight, proj.bias)
    x = x.to(spec.embedding.dtype)
    if spec.position_embedding is not None:
        x = x + spec.position_embedding[:consts.m]
    return x


def _context_rows(plan, consts):
    spec, T = plan.spec, consts.input_ids.shape[1]
    x = F.embedding(consts.input_ids, spec.embedding)
    if spec.position_embedding is not None:
        x = x + spec.position_embedding[consts.m:consts.m + T]
    return x


def step_loss_and_gradient(model, consts, memory, with_gradient=True):
    """memory (B, m, d) -> (loss (B,) float32, g (B, m, d) in memory's dtype or None), both in autograd's
    graph when grad is enabled. Without with_gradient only the loss is formed (no backward half)."""
    plan = layer_plan(model, consts)
    spec, ops, m = plan.spec, plan.ops, consts.m
    B, T = consts.input_ids.shape
    x0 = torch.cat([_memory_rows(plan, consts, memory), _context_rows(plan, consts)], dim=1)  # (B, S, d)
    # layer 0 as a full layer: its stream input h is zero and `pending` is x0 (x0 + 0 is x0 exactly)
    pending, h = x0, torch.zeros_like(x0)
    saved = []
    for i in range(len(spec.layers)):
        pending, h, s = layer_forward(plan, i, pending, h)
        saved.append(s)
    y, h_final, s_final = ops.add_norm_forward(pending, h, spec.final_norm, spec.norm_kind)
    d = y.shape[-1]
    hidden = y[:, m - 1:m - 1 + T].reshape(B * T, d)  # row m-1+i predicts token i
    head = spec.lm_head.weight if consts.write_head is None else consts.write_head
    loss_rows, grad_rows = fused_head_loss_reference(hidden, head.to(y.dtype), consts.targets, consts.row_weights)
    loss = (loss_rows.to(torch.float32) * consts.row_weights).view(B, T).sum(dim=1)
    if not with_gradient:
        return loss, None
    d_final = F.pad(grad_rows.view(B, T, d), (0, 0, m - 1, 1))  # (B, S, d): zero outside the head rows
    g = ops.add_norm_backward(d_final, None, h_final, spec.final_norm, s_final, spec.norm_kind)
    for i in reversed(range(len(spec.layers))):
        g = layer_backward(plan, i, g, saved[i])
    d_mem = g[:, :m]
    proj = consts.memory_proj
    if proj is not None:
        d_mem = torch.matmul(d_mem.to(proj.weight.dtype), proj.weight)
    return loss, d_mem.to(consts.memory_dtype)


def memory_update(consts, memory, grad):
    """M - lr * clip(g), out of place and differentiable (the engine's update twin applied to a copy)."""
    return memory_update__reference(memory.clone(), grad, consts.lr, clip_value=consts.clip_value,
                                    clip_norm=consts.clip_norm)
