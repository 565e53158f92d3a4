"""Per-layer forward and input-gradient backward: the block structures (pre-norm, post-norm, sandwich,
parallel), written once and shared by layer 0 and the other layers, and by the second-order recompute.

Residual stream bookkeeping: a layer receives `pending` (the previous layer's output delta, None at
layer 0) and `h` (the residual stream before it); the fused add + norm forms h + pending. A layer's
backward receives `g`, the gradient w.r.t. the stream after the layer, and returns the gradient
w.r.t. the stream before it. Weights are frozen: only input gradients are formed (engine.md).

Layer 0 differs only before attention: its context rows' work is done once per write (Layer0Context), so
its norm and q/k/v cover the m memory rows; from the attention output on, every row is new and the
sequential tail is the same code as in the other layers.

The attention sublayer of layer_forward / layer_backward is the plan's (`plan.attention`, a
sublayers.AttentionSublayer): the engine's runs in place on its per-write buffers (sublayers.IN_PLACE_ATTENTION);
the recomputed step of a second-order write (recompute.py) runs every layer, layer 0 included, through these
same two functions with an out-of-place attention that autograd can differentiate twice
(recompute_attention.OUT_OF_PLACE_ATTENTION). All else those two functions do is out of place already.
"""
from dataclasses import dataclass
from typing import Any, NamedTuple, Optional

import torch

from .sublayers import (AttnSaved, linear_input_grad, mlp_backward, mlp_forward, output_projection, qkv_backward,
                        qkv_forward, qkv_grad_buffers)


class Tail(NamedTuple):
    """Saved by the sequential tail (attention output -> stream after the layer)."""
    attn_out: Optional[torch.Tensor]  # (B, S, d) input of post_attn_norm, None without one
    post_attn_stats: Optional[torch.Tensor]
    h2: torch.Tensor  # (B, S, d) the stream after the attention sublayer
    mlp_stats: Optional[torch.Tensor]  # stats of mlp_norm, None without one
    pre: Any  # MLP pre-activation(s) (mlp_forward)
    mlp_out: Optional[torch.Tensor]  # (B, S, d) input of post_mlp_norm, None without one
    post_mlp_stats: Optional[torch.Tensor]


class SequentialSaved(NamedTuple):
    h1: torch.Tensor  # the stream the attention sublayer adds to; layer 0: the memory rows x_mem (B, m, d)
    attn_stats: Optional[torch.Tensor]  # stats of attn_norm, None in a post-norm block
    attn: Any  # what the attention sublayer saved (AttnSaved in the engine)
    tail: Tail


class ParallelSaved(NamedTuple):
    h1: torch.Tensor  # the stream both sublayers read; layer 0: the memory rows x_mem (B, m, d)
    attn_stats: torch.Tensor
    attn: Any  # what the attention sublayer saved (AttnSaved in the engine)
    mlp_stats: torch.Tensor
    pre: Any


# ------------------------------------------------------------------ pieces shared by every layer


def _norm_in(spec, ops, norm, x, residual):
    """(normed input, stream x + residual, stats) before a sublayer; without a norm (post-norm blocks) the
    sublayer reads the stream itself (one add, none when residual is None)."""
    if norm is not None:
        return ops.add_norm_forward(x, residual, norm, spec.norm_kind)
    h = x if residual is None else x + residual
    return h, h, None


def _norm_in_backward(spec, ops, norm, d_in, g_stream, h, stats):
    """Gradient of the stream before a sublayer: d_in through its input norm, plus g_stream (the residual)."""
    if norm is None:
        return d_in + g_stream
    return ops.add_norm_backward(d_in, g_stream, h, norm, stats, spec.norm_kind)


def _norm_out(spec, ops, norm, x):
    """(norm(x), stats) on a sublayer's output (post-norm, sandwich); (x, None) without that norm."""
    if norm is None:
        return x, None
    y, _, stats = ops.add_norm_forward(x, None, norm, spec.norm_kind)
    return y, stats


def _norm_out_backward(spec, ops, norm, g, x, stats):
    return g if norm is None else ops.add_norm_backward(g, None, x, norm, stats, spec.norm_kind)


def _tail_forward(spec, ops, layer, attn_out, h1):
    """Sequential block from the attention output (B, S, d) and the stream it adds to -> (pending, h2, Tail)."""
    u, post_attn_stats = _norm_out(spec, ops, layer.post_attn_norm, attn_out)
    b, h2, mlp_stats = _norm_in(spec, ops, layer.mlp_norm, u, h1)
    mlp_out, pre = mlp_forward(spec, ops, layer, b)
    pending, post_mlp_stats = _norm_out(spec, ops, layer.post_mlp_norm, mlp_out)
    keep_attn = layer.post_attn_norm is not None
    keep_mlp = layer.post_mlp_norm is not None
    return pending, h2, Tail(attn_out if keep_attn else None, post_attn_stats, h2, mlp_stats, pre,
                             mlp_out if keep_mlp else None, post_mlp_stats)


def _tail_backward(spec, ops, layer, g, t):
    """g (B, S, d) gradient of the stream after the layer -> (gradient of the attention output, gradient of
    the stream h2 after the attention sublayer, which also reaches h1 through the residual)."""
    d_mlp = _norm_out_backward(spec, ops, layer.post_mlp_norm, g, t.mlp_out, t.post_mlp_stats)
    d_b = mlp_backward(spec, ops, layer, d_mlp, t.pre)
    g2 = _norm_in_backward(spec, ops, layer.mlp_norm, d_b, g, t.h2, t.mlp_stats)
    return _norm_out_backward(spec, ops, layer.post_attn_norm, g2, t.attn_out, t.post_attn_stats), g2


# ------------------------------------------------------------------ layer 0 constants


@dataclass
class Layer0Context:
    q_ctx: torch.Tensor  # (B, T, H, D) context queries, normed and rotated
    state: Any  # context-over-context attention state (ops.attention)
    rows: torch.Tensor  # (B, m + T, d) layer-0 input: context rows filled once, memory rows per step
    # (B, m + T, d) MLP output plus the output projection's bias (down_linears), context rows filled once
    # (parallel residual only)
    mlp_rows: Optional[torch.Tensor]


def layer0_context(spec, ops, qkv_lin, down_lin, qk_norm, x_ctx, ctx_lengths, ctx_tables, m):
    """The layer-0 work on the context rows that no memory can change. x_ctx (B, T, d); down_lin: layer 0's
    down projection of down_linears; qk_norm: its q/k norm launches (qk_norm_parts)."""
    layer = spec.layers[0]
    a_ctx = _norm_in(spec, ops, layer.attn_norm, x_ctx, None)[0]
    qkv = qkv_forward(spec, ops, qkv_lin, qk_norm, a_ctx, ctx_tables)
    state = ops.context_attention_state(qkv.q, qkv.k, qkv.v, ctx_lengths, spec.attn_scale)
    B, T, d = x_ctx.shape
    rows = x_ctx.new_empty(B, m + T, d)
    rows[:, m:].copy_(x_ctx)
    mlp_rows = None
    if spec.parallel_residual:
        b_ctx, _, _ = ops.add_norm_forward(x_ctx, None, layer.mlp_norm, spec.norm_kind)
        mlp_rows = rows.new_empty(B, m + T, d)
        mlp_rows[:, m:].copy_(mlp_forward(spec, ops, layer, b_ctx, down=down_lin)[0])
    return Layer0Context(q_ctx=qkv.q, state=state, rows=rows, mlp_rows=mlp_rows)


def _layer0_attention(plan, a_mem):
    """Memory rows' attention input (B, m, d) -> (o (B, S, H, D), AttnSaved): every row attends to the memory."""
    spec, ops, ctx = plan.spec, plan.ops, plan.layer0
    tables = None if plan.ropes[0] is None else plan.ropes[0].mem
    qkv = qkv_forward(spec, ops, plan.qkv[0], plan.qk_norm[0], a_mem, tables)
    o, lse = ops.memory_attention_forward(qkv.q, qkv.k, qkv.v, ctx.q_ctx, ctx.state, plan.ctx_lengths,
                                          spec.attn_scale)
    return o, AttnSaved(qkv, o, lse)


def _layer0_attention_backward(plan, g_attn, saved):
    """g_attn (B, S, d) gradient of the attention output -> gradient of the memory rows' input (B, m, d)."""
    spec, ops, ctx = plan.spec, plan.ops, plan.layer0
    qkv, o = saved.qkv, saved.o
    do = linear_input_grad(g_attn, spec.layers[0].o).view(o.shape)
    dy, out, dqk = qkv_grad_buffers(spec, plan.qkv[0], qkv)
    ops.memory_attention_backward(do, qkv.q, qkv.k, qkv.v, ctx.q_ctx, o, saved.lse, plan.ctx_lengths,
                                  spec.attn_scale, out=out)
    tables = None if plan.ropes[0] is None else plan.ropes[0].mem
    return qkv_backward(spec, ops, plan.qkv[0], plan.qk_norm[0], qkv, dy, dqk, tables)


# ------------------------------------------------------------------ layers


def layer0_forward(plan, x_mem, in_rows=False):
    """x_mem (B, m, d) memory rows as they enter the model -> (pending, h, saved). in_rows: x_mem is the
    memory rows of the layer-0 input buffer already (see step.memory_in)."""
    spec, ops, ctx = plan.spec, plan.ops, plan.layer0
    layer = spec.layers[0]
    # only the m memory rows of the layer-0 input change: written into the per-write buffer in place
    x = ctx.rows
    if not in_rows:
        x[:, :plan.m].copy_(x_mem)
        if plan.B == 1:  # x_mem may be in the memory's dtype (step.memory_in): the rows hold it cast
            x_mem = x[:, :plan.m]
    a_mem, _, s1 = _norm_in(spec, ops, layer.attn_norm, x_mem, None)
    o, attn_saved = _layer0_attention(plan, a_mem)
    if spec.parallel_residual:
        b_mem, _, s2 = ops.add_norm_forward(x_mem, None, layer.mlp_norm, spec.norm_kind)
        if plan.B == 1:  # the memory rows of mlp_rows are contiguous: the down projection writes them
            _, pre = mlp_forward(spec, ops, layer, b_mem, down=plan.down[0], out=ctx.mlp_rows[0, :plan.m])
        else:
            mlp_mem, pre = mlp_forward(spec, ops, layer, b_mem, down=plan.down[0])
            ctx.mlp_rows[:, :plan.m].copy_(mlp_mem)
        pending = output_projection(o, layer.o, ctx.mlp_rows)  # mlp_rows + o Wo^T, a new tensor
        return pending, x, ParallelSaved(x_mem, s1, attn_saved, s2, pre)
    pending, h2, tail = _tail_forward(spec, ops, layer, output_projection(o, layer.o), x)
    return pending, h2, SequentialSaved(x_mem, s1, attn_saved, tail)


def layer0_backward(plan, g, saved):
    """g (B, S, d) gradient of the stream after layer 0 -> gradient w.r.t. x_mem (B, m, d)."""
    spec, ops, m = plan.spec, plan.ops, plan.m
    layer = spec.layers[0]
    if spec.parallel_residual:
        g_attn = g_stream = g
        d_b = mlp_backward(spec, ops, layer, g[:, :m], saved.pre)
    else:
        g_attn, g_stream = _tail_backward(spec, ops, layer, g, saved.tail)
    d_a = _layer0_attention_backward(plan, g_attn, saved.attn)
    # g_stream[:, :m] (B, m, d) is strided at B > 1 (the first m rows of each sample): read in place
    d_x = _norm_in_backward(spec, ops, layer.attn_norm, d_a, g_stream[:, :m], saved.h1, saved.attn_stats)
    if spec.parallel_residual:
        d_x = ops.add_norm_backward(d_b, d_x, saved.h1, layer.mlp_norm, saved.mlp_stats, spec.norm_kind)
    return d_x


def layer_forward(plan, i, pending, h):
    """Layer i: (pending, h) -> (pending', h', saved). The engine runs it for i >= 1 (layer 0: layer0_forward);
    the recompute for every layer, layer 0 with pending its input rows and h None."""
    spec, ops, attention = plan.spec, plan.ops, plan.attention
    layer = spec.layers[i]
    a, h1, s1 = _norm_in(spec, ops, layer.attn_norm, pending, h)
    if spec.parallel_residual:
        # out = mlp(norm2(h1)) + attn(norm1(h1)): the output projection accumulates onto the MLP output
        b, _, s2 = ops.add_norm_forward(h1, None, layer.mlp_norm, spec.norm_kind)
        mlp_out, pre = mlp_forward(spec, ops, layer, b, down=plan.down[i])
        out, attn_saved = attention.forward(plan, i, a, addend=mlp_out)
        return out, h1, ParallelSaved(h1, s1, attn_saved, s2, pre)
    attn_out, attn_saved = attention.forward(plan, i, a)
    pending, h2, tail = _tail_forward(spec, ops, layer, attn_out, h1)
    return pending, h2, SequentialSaved(h1, s1, attn_saved, tail)


def layer_backward(plan, i, g, saved):
    """g (B, S, d) gradient of the stream after layer i -> gradient of the stream before it."""
    spec, ops, attention = plan.spec, plan.ops, plan.attention
    layer = spec.layers[i]
    if spec.parallel_residual:
        d_b = mlp_backward(spec, ops, layer, g, saved.pre)
        d_a = attention.backward(plan, i, g, saved.attn)
        g1 = ops.add_norm_backward(d_a, g, saved.h1, layer.attn_norm, saved.attn_stats, spec.norm_kind)
        return ops.add_norm_backward(d_b, g1, saved.h1, layer.mlp_norm, saved.mlp_stats, spec.norm_kind)
    g_attn, g2 = _tail_backward(spec, ops, layer, g, saved.tail)
    d_a = attention.backward(plan, i, g_attn, saved.attn)
    return _norm_in_backward(spec, ops, layer.attn_norm, d_a, g2, saved.h1, saved.attn_stats)
