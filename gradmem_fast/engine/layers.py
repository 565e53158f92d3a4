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

from ..models.spec import Linear


def linear(x, lin):
    return F.linear(x, lin.weight, lin.bias)


def linear_input_grad(dy, lin):
    """dX = dY W for Y = X W^T + b: (..., out) -> (..., in)."""
    return torch.matmul(dy, lin.weight)


def qkv_linears(spec):
    """Per layer, the q/k/v projection as one Linear: the model's own for the concat and per_head layouts;
    for separate q, k, v their concatenation, output rows [q | k | v] (a copy made once per write, so one
    GEMM replaces three in each direction). A missing bias beside present ones is taken as zero."""
    if spec.qkv_layout != "separate":
        return tuple(layer.qkv for layer in spec.layers)
    fused = []
    for layer in spec.layers:
        parts = (layer.q, layer.k, layer.v)
        weight = torch.cat([p.weight for p in parts])
        bias = None
        if any(p.bias is not None for p in parts):
            bias = torch.cat([p.weight.new_zeros(p.weight.shape[0]) if p.bias is None else p.bias for p in parts])
        fused.append(Linear(weight, bias))
    return tuple(fused)


def _fold_bias(a, b):
    return a if b is None else (b if a is None else a + b)


def down_linears(spec):
    """Per layer, the MLP down projection the engine runs: the model's own for a sequential residual; for a
    parallel residual its weight with the attention output projection's bias added to its own (a vector made
    once per write), so the layer's output `mlp + o Wo^T` is one GEMM accumulating onto the MLP's (the
    residual add and the second bias are absorbed)."""
    if not spec.parallel_residual:
        return tuple(layer.down for layer in spec.layers)
    return tuple(Linear(layer.down.weight, _fold_bias(layer.down.bias, layer.o.bias)) for layer in spec.layers)


def _per_head(spec):
    return spec.qkv_layout == "per_head"


def _split_qkv(spec, y):
    """y (B, S, out) laid out like the projection output -> (q, k, v, qk): (B, S, H, hd) views, and qk the
    view of q and k together, so one rotary launch covers both: (B, S, H + Hkv, hd) for [q | k | v] layouts,
    (B, S, H, 2, hd) for the per-head layout [q_h | k_h | v_h]."""
    H, Hkv, hd = spec.num_heads, spec.num_kv_heads, spec.head_dim
    if _per_head(spec):
        heads = y.unflatten(-1, (H, 3, hd))
        q, k, v = heads.unbind(-2)
        return q, k, v, heads[..., :2, :]
    qk, v = y.split(((H + Hkv) * hd, Hkv * hd), dim=-1)
    qk = qk.unflatten(-1, (H + Hkv, hd))
    return qk[..., :H, :], qk[..., H:, :], v.unflatten(-1, (Hkv, hd)), qk


def qkv_project(spec, lin, x):
    """x (B, S, d) -> (q, k, v, qk) of _split_qkv, bias added, rotary not applied."""
    return _split_qkv(spec, linear(x, lin))


def qkv_grad_buffers(spec, lin, q):
    """(dy, (dq, dk, dv), dqk): dy (B, S, out) laid out like the projection output, dq, dk, dv (and dq, dk
    together) views into it, so the attention backward writes its gradients in place and the input
    gradient is one GEMM `dy W`, with no (B, S, out) concatenation of dq, dk, dv in between."""
    dy = torch.empty(*q.shape[:2], lin.weight.shape[0], dtype=q.dtype, device=q.device)
    dq, dk, dv, dqk = _split_qkv(spec, dy)
    return dy, (dq, dk, dv), dqk


# ------------------------------------------------------------------ MLP


def mlp_forward(spec, ops, layer, b, down=None, out=None):
    """b (B, S, d) normed input -> (out (B, S, d), saved pre-activations). down: the down projection
    (default layer.down; see down_linears); out: a contiguous buffer of B*S*d elements it writes into."""
    if spec.activation == "swiglu":
        pre = (linear(b, layer.gate), linear(b, layer.up))
    else:
        pre = linear(b, layer.up)
    act = ops.activation_forward(spec.activation, pre)
    down = layer.down if down is None else down
    if out is None:
        return linear(act, down), pre
    act2, out2 = act.view(-1, act.shape[-1]), out.view(-1, down.weight.shape[0])
    if down.bias is None:
        torch.mm(act2, down.weight.t(), out=out2)
    else:
        torch.addmm(down.bias, act2, down.weight.t(), out=out2)
    return out.view(*b.shape[:-1], down.weight.shape[0]), pre


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


def _rotate_qk_(spec, ops, qk, cos, sin, inverse=False):
    """Rotary on q and k in place, one launch on their joint view qk (_split_qkv)."""
    if spec.rotary is not None:
        ops.apply_rotary_(qk, cos, sin, spec.rotary, inverse=inverse)


def output_projection(o, lin, addend=None, in_place=False):
    """o (B, S, H, D) -> o Wo^T + b (B, S, d); with addend (B, S, d, contiguous) addend + o Wo^T in one GEMM,
    the bias not added (it is in addend: down_linears), written into addend itself when in_place."""
    if addend is None:
        return linear(o.flatten(2), lin)
    a2, o2 = addend.view(-1, addend.shape[-1]), o.reshape(-1, lin.weight.shape[1])
    if in_place:
        return a2.addmm_(o2, lin.weight.t()).view(addend.shape)
    return torch.addmm(a2, o2, lin.weight.t()).view(addend.shape)


def attention_block_forward(spec, ops, layer, qkv_lin, a, lengths, rope, addend=None):
    """Attention over all S rows (layers >= 1). a (B, S, d) normed input -> (out (B, S, d), saved).
    addend: the (B, S, d) MLP output of a parallel-residual layer, accumulated into in place (output_projection)."""
    q, k, v, qk = qkv_project(spec, qkv_lin, a)
    cos, sin = (rope.cos_all, rope.sin_all) if rope is not None else (None, None)
    _rotate_qk_(spec, ops, qk, cos, sin)
    o, lse = ops.attention_forward(q, k, v, lengths, spec.attn_scale)
    return output_projection(o, layer.o, addend, in_place=True), (q, k, v, o, lse)


def attention_block_backward(spec, ops, layer, qkv_lin, g, saved, lengths, rope):
    q, k, v, o, lse = saved
    do = linear_input_grad(g, layer.o).view(o.shape)
    dy, out, dqk = qkv_grad_buffers(spec, qkv_lin, q)
    dq, dk, dv = ops.attention_backward(do, q, k, v, o, lse, lengths, spec.attn_scale, out=out)
    cos, sin = (rope.cos_all, rope.sin_all) if rope is not None else (None, None)
    _rotate_qk_(spec, ops, dqk, cos, sin, inverse=True)
    return linear_input_grad(dy, qkv_lin)


# ------------------------------------------------------------------ layer 0 constants


@dataclass
class Layer0Context:
    q_ctx: torch.Tensor  # (B, T, H, D) context queries, rotated
    state: Any  # context-over-context attention state (ops.attention)
    rows: torch.Tensor  # (B, m + T, d) layer-0 input: context rows filled once, memory rows per step
    # (B, m + T, d) MLP output plus the output projection's bias (down_linears), context rows filled once
    # (parallel residual only)
    mlp_rows: Optional[torch.Tensor]


def layer0_context(spec, ops, qkv_lin, down_lin, x_ctx, ctx_lengths, ctx_tables, m):
    """The layer-0 work on the context rows that no memory can change. x_ctx (B, T, d); down_lin: layer 0's
    down projection of down_linears."""
    layer = spec.layers[0]
    a_ctx, _, _ = ops.add_norm_forward(x_ctx, None, layer.attn_norm, spec.norm_kind)
    q, k, v, qk = qkv_project(spec, qkv_lin, a_ctx)
    if spec.rotary is not None:
        _rotate_qk_(spec, ops, qk, *ctx_tables)
    state = ops.context_attention_state(q, k, v, ctx_lengths, spec.attn_scale)
    B, T, d = x_ctx.shape
    rows = x_ctx.new_empty(B, m + T, d)
    rows[:, m:].copy_(x_ctx)
    mlp_rows = None
    if spec.parallel_residual:
        b_ctx, _, _ = ops.add_norm_forward(x_ctx, None, layer.mlp_norm, spec.norm_kind)
        mlp_rows = rows.new_empty(B, m + T, d)
        mlp_rows[:, m:].copy_(mlp_forward(spec, ops, layer, b_ctx, down=down_lin)[0])
    return Layer0Context(q_ctx=q, state=state, rows=rows, mlp_rows=mlp_rows)


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
    a_mem, _, s1 = ops.add_norm_forward(x_mem, None, layer.attn_norm, spec.norm_kind)
    q, k, v, qk = qkv_project(spec, plan.qkv[0], a_mem)
    if plan.rope is not None:
        _rotate_qk_(spec, ops, qk, plan.rope.cos_mem, plan.rope.sin_mem)
    o, lse = ops.memory_attention_forward(q, k, v, ctx.q_ctx, ctx.state, plan.ctx_lengths, spec.attn_scale)
    attn_saved = (q, k, v, o, lse)
    if spec.parallel_residual:
        b_mem, _, s2 = ops.add_norm_forward(x_mem, None, layer.mlp_norm, spec.norm_kind)
        if plan.B == 1:  # the memory rows of mlp_rows are contiguous: the down projection writes them
            _, pre = mlp_forward(spec, ops, layer, b_mem, down=plan.down[0], out=ctx.mlp_rows[0, :plan.m])
        else:
            mlp_mem, pre = mlp_forward(spec, ops, layer, b_mem, down=plan.down[0])
            ctx.mlp_rows[:, :plan.m].copy_(mlp_mem)
        pending = output_projection(o, layer.o, ctx.mlp_rows)  # mlp_rows + o Wo^T, a new tensor
        return pending, x, (x_mem, s1, attn_saved, s2, pre)
    attn_out = output_projection(o, layer.o)
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
    dy, out, dqk = qkv_grad_buffers(spec, plan.qkv[0], q)
    dq, dk, dv = ops.memory_attention_backward(do, q, k, v, ctx.q_ctx, o, lse, plan.ctx_lengths,
                                               spec.attn_scale, out=out)
    if plan.rope is not None:
        _rotate_qk_(spec, ops, dqk, plan.rope.cos_mem, plan.rope.sin_mem, inverse=True)
    d_a = linear_input_grad(dy, plan.qkv[0])
    # g_mem (B, m, d) is strided at B > 1 (the first m rows of each sample): the norm backward reads it in place
    d_x = ops.add_norm_backward(d_a, g_mem, x_mem, layer.attn_norm, s1, spec.norm_kind)
    if spec.parallel_residual:
        d_x = ops.add_norm_backward(d_b, d_x, x_mem, layer.mlp_norm, s2, spec.norm_kind)
    return d_x


def layer_forward(plan, i, pending, h):
    """Layer i >= 1: (pending, h) -> (pending', h', saved)."""
    spec, ops = plan.spec, plan.ops
    layer = spec.layers[i]
    a, h1, s1 = ops.add_norm_forward(pending, h, layer.attn_norm, spec.norm_kind)
    if spec.parallel_residual:
        # out = mlp(norm2(h1)) + attn(norm1(h1)): the output projection accumulates onto the MLP output
        b, _, s2 = ops.add_norm_forward(h1, None, layer.mlp_norm, spec.norm_kind)
        mlp_out, pre = mlp_forward(spec, ops, layer, b, down=plan.down[i])
        out, attn_saved = attention_block_forward(spec, ops, layer, plan.qkv[i], a, plan.full_lengths, plan.rope,
                                                  addend=mlp_out)
        return out, h1, (h1, s1, attn_saved, s2, pre)
    attn_out, attn_saved = attention_block_forward(spec, ops, layer, plan.qkv[i], a, plan.full_lengths,
                                                   plan.rope)
    b, h2, s2 = ops.add_norm_forward(attn_out, h1, layer.mlp_norm, spec.norm_kind)
    mlp_out, pre = mlp_forward(spec, ops, layer, b)
    return mlp_out, h2, (h1, s1, attn_saved, h2, s2, pre)


def layer_backward(plan, i, g, saved):
    """g (B, S, d) gradient of the stream after layer i -> gradient of the stream before it."""
    spec, ops = plan.spec, plan.ops
    layer = spec.layers[i]
    if spec.parallel_residual:
        h1, s1, attn_saved, s2, pre = saved
        d_b = mlp_backward(spec, ops, layer, g, pre)
        d_a = attention_block_backward(spec, ops, layer, plan.qkv[i], g, attn_saved, plan.full_lengths, plan.rope)
        g1 = ops.add_norm_backward(d_a, g, h1, layer.attn_norm, s1, spec.norm_kind)
        return ops.add_norm_backward(d_b, g1, h1, layer.mlp_norm, s2, spec.norm_kind)
    h1, s1, attn_saved, h2, s2, pre = saved
    d_b = mlp_backward(spec, ops, layer, g, pre)
    g2 = ops.add_norm_backward(d_b, g, h2, layer.mlp_norm, s2, spec.norm_kind)
    d_a = attention_block_backward(spec, ops, layer, plan.qkv[i], g2, attn_saved, plan.full_lengths,
                                   plan.rope)
    return ops.add_norm_backward(d_a, g2, h1, layer.attn_norm, s1, spec.norm_kind)
