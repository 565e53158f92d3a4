"""One write step recomputed under autograd: the step's loss and its gradient g(M) = grad_M sum_b L_b(M) as
differentiable functions of the memory and of every weight (second_order.md).

The engine's hand-written backward runs on ops that differentiate twice (recompute_ops.RecomputeOps: add +
norm and the activations as ops whose backward is a written second-order rule, rotary on its linear twin;
attention, q/k norm and the head + loss as their own such ops), so its output g is a graph that autograd
differentiates once more (reverse over reverse) and whose nodes save only the ops' inputs. The layers are the
engine's own (layers.layer_forward / layer_backward, every block structure written once there) with the
out-of-place attention sublayer of recompute_attention.py. What the fast step caches per write (the layer-0
context rows' norm, q/k/v, rotary and context-over-context attention, the fused q/k/v weights, the folded
biases and norm offsets) depends on the weights, so here it is rebuilt inside the step's graph: layer 0 runs
as a full layer over all rows.

Shapes: B samples, T context tokens, m memory rows, S = m + T, d hidden size.
"""
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F

from ..models import describe
from ..models.forward import layer_rotary
from ..ops.head_loss_double_backward import head_loss_op
from ..ops.memory_update import memory_update_op
from .layers import layer_backward, layer_forward
from .plan import fold_norm_offsets
from .recompute_attention import OUT_OF_PLACE_ATTENTION
from .recompute_ops import recompute_ops_for
from .sublayers import down_linears, qk_norm_parts, qkv_linears


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
    op_backend: str = "auto"  # the write's op backend, for the head + loss op and the attention ops


def step_constants(input_ids, attention_mask, m, memory_dtype, lr, write_head, memory_proj, clip_value,
                   clip_norm, op_backend="auto"):
    mask = attention_mask.to(torch.int32)
    lengths = mask.sum(dim=1, dtype=torch.int32)
    real = mask.bool()
    targets = torch.where(real, input_ids, torch.zeros_like(input_ids)).reshape(-1)
    row_weights = (real.to(torch.float32) / lengths.to(torch.float32)[:, None]).reshape(-1)
    return StepConstants(input_ids=input_ids, targets=targets, row_weights=row_weights, full_lengths=lengths + m,
                         m=m, memory_dtype=memory_dtype, write_head=write_head, memory_proj=memory_proj,
                         clip_value=clip_value, clip_norm=clip_norm,
                         lr=torch.full((), lr, dtype=torch.float32, device=input_ids.device),
                         op_backend=op_backend)


@dataclass
class RecomputePlan:
    """What layers.layer_forward / layer_backward and the out-of-place attention sublayer read, built from the
    model's parameters under the current grad mode, so the fused q/k/v weights, folded biases, q/k norm
    weights and norm offsets are in the step's graph."""
    spec: Any  # models.spec.ModelSpec, norm offsets folded (plan.fold_norm_offsets)
    ops: Any  # recompute_ops.RecomputeOps on the write's op backend
    qkv: tuple  # per layer, the q/k/v projection as one Linear (sublayers.qkv_linears)
    down: tuple  # per layer, the MLP down projection as the engine runs it (sublayers.down_linears)
    qk_norm: tuple  # per layer, the q/k norm's parts (sublayers.qk_norm_parts), or None
    tables: tuple  # per layer, (cos, sin, rotary) of its rotary for positions 0..S-1, or None
    full_lengths: torch.Tensor  # (B,) int32 m + L_b
    attention: Any  # recompute_attention.OUT_OF_PLACE_ATTENTION


def layer_plan(model, consts):
    """The RecomputePlan of one step. Rotary tables depend on no weight (the inv_freq buffers); one set per
    distinct rotary (per-layer rotary: Gemma 3's local layers)."""
    spec = fold_norm_offsets(describe(model))
    ops = recompute_ops_for(consts.op_backend)
    positions = torch.arange(consts.m + consts.input_ids.shape[1], device=consts.input_ids.device)
    by_rotary, tables = {}, []
    for layer in spec.layers:
        rotary = layer_rotary(spec, layer)
        if rotary is not None and id(rotary) not in by_rotary:
            by_rotary[id(rotary)] = (*ops.rotary_tables(rotary, positions), rotary)
        tables.append(None if rotary is None else by_rotary[id(rotary)])
    return RecomputePlan(spec=spec, ops=ops, qkv=qkv_linears(spec), down=down_linears(spec),
                         qk_norm=qk_norm_parts(spec), tables=tuple(tables), full_lengths=consts.full_lengths,
                         attention=OUT_OF_PLACE_ATTENTION)


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
    if spec.embedding_scale is not None:  # as plan.build_plan: the memory rows are not scaled
        x = x * spec.embedding_scale
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
    # layer 0 as a full layer: `pending` is x0 and there is no stream before it (h None: its stream is x0)
    pending, h = x0, None
    saved = []
    for i in range(len(spec.layers)):
        pending, h, s = layer_forward(plan, i, pending, h)
        saved.append(s)
    y, h_final, s_final = ops.add_norm_forward(pending, h, spec.final_norm, spec.norm_kind)
    d = y.shape[-1]
    hidden = y[:, m - 1:m - 1 + T].reshape(B * T, d)  # row m-1+i predicts token i
    head = spec.lm_head.weight if consts.write_head is None else consts.write_head
    # the head's backward streams over vocabulary blocks: no (rows x V) logits are kept for the second order
    loss_rows, grad_rows = head_loss_op(hidden, head.to(y.dtype), consts.targets, consts.row_weights,
                                        backend=consts.op_backend, validate=False)
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
    """M - lr * clip(g), out of place and differentiable (its backward the update's written rule)."""
    return memory_update_op(memory, grad, consts.lr, clip_value=consts.clip_value, clip_norm=consts.clip_norm,
                            validate=False)
