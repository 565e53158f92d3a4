"""Per-layer forward and input-gradient backward, shared by all families.

Residual stream bookkeeping: a layer receives `pending` (the previous layer's output delta, None at
layer 0) and `h` (the residual stream before it); the fused add + norm forms h + pending. A layer's
backward receives `g`, the gradient w.r.t. the stream after the layer, and returns the gradient
w.r.t. the stream before it. Weights are frozen: only input gradients are formed (engine.md).
"""
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F


def linear(x, lin):
    return F.linear(x, lin.weight, lin.bias)


def linear_input_grad(dy, lin):
    """dX = dY W for Y = X W^T + b: (..., out) -> (..., in)."""
    return torch.matmul(dy, lin.weight)


def _qkv(spec, layer, x):
    from ..models.qkv import qkv_project
    return qkv_project(spec, layer, x, validate=False)


def _qkv_backward(spec, layer, dq, dk, dv):
    from ..models.qkv import qkv_project_backward
    return qkv_project_backward(spec, layer, dq, dk, dv, validate=False)


def qkv_grad_buffers(spec, layer, q, k):
    """(dy, (dq, dk, dv)) for a fused q/k/v projection, else (None, None).

    dy (B, S, out) is laid out like the projection output and dq, dk, dv are views into it, so the
    attention backward writes its gradients in place and the input gradient is one GEMM `dy W`,
    with no (B, S, out) concatenation of dq, dk, dv in between.
    """
    if spec.qkv_layout not in ("concat", "per_head"):
        return None, None
    H, Hkv, hd = q.shape[2], k.shape[2], q.shape[3]
    lead = q.shape[:2]
    dy = torch.empty(*lead, layer.qkv.weight.shape[0], dtype=q.dtype, device=q.device)
    if spec.qkv_layout == "concat":
        dq, dk, dv = dy.split((H * hd, Hkv * hd, Hkv * hd), dim=-1)
        return dy, (dq.unflatten(-1, (H, hd)), dk.unflatten(-1, (Hkv, hd)), dv.unflatten(-1, (Hkv, hd)))
    return dy, tuple(dy.view(*lead, H, 3, hd).unbind(-2))


def qkv_input_grad(spec, layer, dy, dq, dk, dv):
    """Input gradient of the q/k/v projection (B, S, d); dy from qkv_grad_buffers or None."""
    if dy is None:
        return _qkv_backward(spec, layer, dq, dk, dv)
    return torch.matmul(dy, layer.qkv.weight)


# ------------------------------------------------------------------ MLP


def mlp_forward(spec, ops, layer, b):
    """b (B, S, d) normed input -> (out (B, S, d), saved pre-activations)."""
    if spec.activation == "swiglu":
        pre = (linear(b, layer.gate), linear(b, layer.up))
    else:
        pre = linear(b, layer.up)
    act = ops.activation_forward(spec.activation, pre)
    return linear(act, layer.down), pre


def mlp_backward(spec, ops, layer, g, pre):
    """g (B, S, d) gradient of the MLP output -> gradient of its normed input (B, S, d)."""
    d_act = linear_input_grad(g, layer.down)
    d_pre = ops.activation_backward(spec.activation, d_act, pre)
    if spec.activation == "swiglu":
        d_gate, d_up = d_pre
        return torch.addmm(linear_input_grad(d_up, layer.up).flatten(0, -2), d_gate.flatten(0, -2),
                           layer.gate.weight).view(g.shape)
    return linear_input_grad(d_pre, layer.up)


# ------------------------------------------------------------------ attention


def _rotate_(spec, ops, x, cos, sin, inverse=False):
    if spec.rotary is not None:
        ops.apply_rotary_(x, cos, sin, spec.rotary, inverse=inverse)


def attention_block_forward(spec, ops, layer, a, lengths, rope):
    """Attention over all S rows (layers >= 1). a (B, S, d) normed input -> (out (B, S, d), saved)."""
    q, k, v = _qkv(spec, layer, a)
    cos, sin = (rope.cos_all, rope.sin_all) if rope is not None else (None, None)
    _rotate_(spec, ops, q, cos, sin)
    _rotate_(spec, ops, k, cos, sin)
    o, lse = ops.attention_forward(q, k, v, lengths, spec.attn_scale)
    return linear(o.flatten(2), layer.o), (q, k, v, o, lse)


def attention_block_backward(spec, ops, layer, g, saved, lengths, rope):
    q, k, v, o, lse = saved
    do = linear_input_grad(g, layer.o).view(o.shape)
    dy, out = qkv_grad_buffers(spec, layer, q, k)
    dq, dk, dv = ops.attention_backward(do, q, k, v, o, lse, lengths, spec.attn_scale, out=out)
    cos, sin = (rope.cos_all, rope.sin_all) if rope is not None else (None, None)
    _rotate_(spec, ops, dq, cos, sin, inverse=True)
    _rotate_(spec, ops, dk, cos, sin, inverse=True)
    return qkv_input_grad(spec, layer, dy, dq, dk, dv)


# ------------------------------------------------------------------ layer 0 constants


@dataclass
class Layer0Context:
    q_ctx: torch.Tensor  # (B, T, H, D) context queries, rotated
    state: Any  # context-over-context attention state (ops.attention)
    rows: torch.Tensor  # (B, m + T, d) layer-0 input: context rows filled once, memory rows per step
    mlp_rows: Optional[torch.Tensor]  # (B, m + T, d) MLP output, context rows filled once (parallel only)


def layer0_context(spec, ops, x_ctx, ctx_lengths, ctx_tables, m):
    """The layer-0 work on the context rows that no memory can change. x_ctx (B, T, d)."""
    layer = spec.layers[0]
    a_ctx, _, _ = ops.add_norm_forward(x_ctx, None, layer.attn_norm, spec.norm_kind)
    q, k, v = _qkv(spec, layer, a_ctx)
    if spec.rotary is not None:
        cos, sin = ctx_tables
        _rotate_(spec, ops, q, cos, sin)
        _rotate_(spec, ops, k, cos, sin)
    state = ops.context_attention_state(q, k, v, ctx_lengths, spec.attn_scale)
    B, T, d = x_ctx.shape
    rows = x_ctx.new_empty(B, m + T, d)
    rows[:, m:].copy_(x_ctx)
    mlp_rows = None
    if spec.parallel_residual:
        b_ctx, _, _ = ops.add_norm_forward(x_ctx, None, layer.mlp_norm, spec.norm_kind)
        mlp_rows = rows.new_empty(B, m + T, d)
        mlp_rows[:, m:].copy_(mlp_forward(spec, ops, layer, b_ctx)[0])
    return Layer0Context(q_ctx=q, state=state, rows=rows, mlp_rows=mlp_rows)


# ------------------------------------------------------------------ layers


def layer0_forward(plan, x_mem):
    """x_mem (B, m, d) memory rows as they enter the model -> (pending, h, saved)."""
    spec, ops, ctx = plan.spec, plan.ops, plan.layer0
    layer = spec.layers[0]
    a_mem, _, s1 = ops.add_norm_forward(x_mem, None, layer.attn_norm, spec.norm_kind)
    q, k, v = _qkv(spec, layer, a_mem)
    if plan.rope is not None:
        _rotate_(spec, ops, q, plan.rope.cos_mem, plan.rope.sin_mem)
        _rotate_(spec, ops, k, plan.rope.cos_mem, plan.rope.sin_mem)
    o, lse = ops.memory_attention_forward(q, k, v, ctx.q_ctx, ctx.state, plan.ctx_lengths, spec.attn_scale)
    attn_out = linear(o.flatten(2), layer.o)
    # only the m memory rows of the layer-0 input change: written into the per-write buffer in place
    x = ctx.rows
    x[:, :plan.m].copy_(x_mem)
    attn_saved = (q, k, v, o, lse)
    if spec.parallel_residual:
        b_mem, _, s2 = ops.add_norm_forward(x_mem, None, layer.mlp_norm, spec.norm_kind)
        mlp_mem, pre = mlp_forward(spec, ops, layer, b_mem)
        ctx.mlp_rows[:, :plan.m].copy_(mlp_mem)
        pending = attn_out.add_(ctx.mlp_rows)
        return pending, x, (x_mem, s1, attn_saved, s2, pre)
    b, h2, s2 = ops.add_norm_forward(attn_out, x, layer.mlp_norm, spec.norm_kind)
    mlp_out, pre = mlp_forward(spec, ops, layer, b)
    return mlp_out, h2, (x_mem, s1, attn_saved, h2, s2, pre)


def layer0_backward(plan, g, saved):
    """g (B, S, d) gradient of the stream after layer 0 -> gradient w.r.t. x_mem (B, m, d)."""
    spec, ops, ctx, m = plan.spec, plan.ops, plan.layer0, plan.m
    layer = spec.layers[0]
    if spec.parallel_residual:
        x_mem, s1, attn_saved, s2, pre = saved
        g_attn = g
        g_mem = g[:, :m]
        d_b = mlp_backward(spec, ops, layer, g_mem, pre)
    else:
        x_mem, s1, attn_saved, h2, s2, pre = saved
        d_b = mlp_backward(spec, ops, layer, g, pre)
        g_attn = ops.add_norm_backward(d_b, g, h2, layer.mlp_norm, s2, spec.norm_kind)
        g_mem = g_attn[:, :m]
    q, k, v, o, lse = attn_saved
    do = linear_input_grad(g_attn, layer.o).view(o.shape)
    dy, out = qkv_grad_buffers(spec, layer, q, k)
    dq, dk, dv = ops.memory_attention_backward(do, q, k, v, ctx.q_ctx, o, lse, plan.ctx_lengths,
                                               spec.attn_scale, out=out)
    if plan.rope is not None:
        _rotate_(spec, ops, dq, plan.rope.cos_mem, plan.rope.sin_mem, inverse=True)
        _rotate_(spec, ops, dk, plan.rope.cos_mem, plan.rope.sin_mem, inverse=True)
    d_a = qkv_input_grad(spec, layer, dy, dq, dk, dv)
    g_mem = g_mem.contiguous()
    d_x = ops.add_norm_backward(d_a, g_mem, x_mem, layer.attn_norm, s1, spec.norm_kind)
    if spec.parallel_residual:
        d_x = ops.add_norm_backward(d_b, d_x, x_mem, layer.mlp_norm, s2, spec.norm_kind)
    return d_x


def layer_forward(plan, layer, pending, h):
    """A layer >= 1: (pending, h) -> (pending', h', saved)."""
    spec, ops = plan.spec, plan.ops
    a, h1, s1 = ops.add_norm_forward(pending, h, layer.attn_norm, spec.norm_kind)
    attn_out, attn_saved = attention_block_forward(spec, ops, layer, a, plan.full_lengths, plan.rope)
    if spec.parallel_residual:
        b, _, s2 = ops.add_norm_forward(h1, None, layer.mlp_norm, spec.norm_kind)
        mlp_out, pre = mlp_forward(spec, ops, layer, b)
        return attn_out + mlp_out, h1, (h1, s1, attn_saved, s2, pre)
    b, h2, s2 = ops.add_norm_forward(attn_out, h1, layer.mlp_norm, spec.norm_kind)
    mlp_out, pre = mlp_forward(spec, ops, layer, b)
    return mlp_out, h2, (h1, s1, attn_saved, h2, s2, pre)


def layer_backward(plan, layer, g, saved):
    """g (B, S, d) gradient of the stream after the layer -> gradient of the stream before it."""
    spec, ops = plan.spec, plan.ops
    if spec.parallel_residual:
        h1, s1, attn_saved, s2, pre = saved
        d_b = mlp_backward(spec, ops, layer, g, pre)
        d_a = attention_block_backward(spec, ops, layer, g, attn_saved, plan.full_lengths, plan.rope)
        g1 = ops.add_norm_backward(d_a, g, h1, layer.attn_norm, s1, spec.norm_kind)
        return ops.add_norm_backward(d_b, g1, h1, layer.mlp_norm, s2, spec.norm_kind)
    h1, s1, attn_saved, h2, s2, pre = saved
    d_b = mlp_backward(spec, ops, layer, g, pre)
    g2 = ops.add_norm_backward(d_b, g, h2, layer.mlp_norm, s2, spec.norm_kind)
    d_a = attention_block_backward(spec, ops, layer, g2, attn_saved, plan.full_lengths, plan.rope)
    return ops.add_norm_backward(d_a, g2, h1, layer.attn_norm, s1, spec.norm_kind)
