"""The sublayers a block is made of, forward and input-gradient backward: the projections, q/k/v with their
optional RMS norm and rotary, attention over all rows, the MLP. engine/layers.py assembles them into blocks.

Shapes: B samples, S rows, d hidden size, H query heads, Hkv key/value heads, D head dim.
"""
from typing import Callable, NamedTuple, Optional, Tuple

import torch

from ..models.forward import linear
from ..models.qkv import split_qkv
from ..models.spec import GATED, Linear


def linear_input_grad(dy, lin):
    """dX = dY W for Y = X W^T + b: (..., out) -> (..., in)."""
    return torch.matmul(dy, lin.weight)


# ------------------------------------------------------------------ per-write weights


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


class QKNormPart(NamedTuple):
    """One launch of the q/k RMS norm: heads [start, stop) of the joint q/k view (B, S, H + Hkv, D), seen as
    (B, S, G, D') with weight (G, D'): (H + Hkv, D) per head, (2, H*D) or (1, H*D) over whole projections."""
    start: int
    stop: int
    weight: torch.Tensor  # (G, D')
    eps: float


def qk_norm_parts(spec):
    """Per layer, the q/k norm as launches (QKNormPart tuples), or None; weights made once per write."""
    if spec.qk_norm is None:
        return (None,) * len(spec.layers)
    H, Hkv, D = spec.num_heads, spec.num_kv_heads, spec.head_dim
    out = []
    for layer in spec.layers:
        qn, kn = layer.q_norm, layer.k_norm
        if spec.qk_norm == "head" and qn.eps == kn.eps:
            weight = torch.cat((qn.weight.expand(H, D), kn.weight.expand(Hkv, D)))
            out.append((QKNormPart(0, H + Hkv, weight, qn.eps),))
        elif spec.qk_norm == "full" and H == Hkv and qn.eps == kn.eps:
            out.append((QKNormPart(0, 2 * H, torch.stack((qn.weight, kn.weight)), qn.eps),))
        else:
            q_w, k_w = (qn.weight.expand(H, D).contiguous(), kn.weight.expand(Hkv, D).contiguous()) \
                if spec.qk_norm == "head" else (qn.weight[None], kn.weight[None])
            out.append((QKNormPart(0, H, q_w, qn.eps), QKNormPart(H, H + Hkv, k_w, kn.eps)))
    return tuple(out)


def qk_norm_view(qk, part):
    """The (B, S, G, D') view of heads [start, stop) of qk (B, S, H + Hkv, D); D contiguous, so a view."""
    heads = qk[..., part.start:part.stop, :]
    return heads.view(*heads.shape[:-2], *part.weight.shape)


# ------------------------------------------------------------------ q, k, v


class QKSaved(NamedTuple):
    """What the q/k norm's backward needs: its input and per-row rstd of each part."""
    pre: torch.Tensor  # (B, S, H + Hkv, D) q and k before the norm (a view of the projection output)
    rstd: Tuple[torch.Tensor, ...]  # per QKNormPart, (B, S, G) float32


class QKV(NamedTuple):
    """Attention inputs: q (B, S, H, D), k, v (B, S, Hkv, D), q and k normed (when the model norms them) and
    rotated; qk their joint view; norm the q/k norm's saved state, None without one."""
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    norm: Optional[QKSaved]


def qkv_forward(spec, ops, lin, norm_parts, x, tables):
    """x (B, S, d) -> QKV. lin: the layer's fused projection (qkv_linears); norm_parts: its q/k norm launches
    (qk_norm_parts) or None; tables: (cos, sin, rotary) for these rows' positions (plan.Rope), or None."""
    q, k, v, qk = split_qkv(spec, linear(x, lin))
    saved = None
    if norm_parts is not None:
        normed = torch.empty(qk.shape, dtype=qk.dtype, device=qk.device)
        rstd = tuple(ops.qk_norm_forward(qk_norm_view(qk, p), p.weight, p.eps, out=qk_norm_view(normed, p))[1]
                     for p in norm_parts)
        saved = QKSaved(qk, rstd)
        qk = normed
        q, k = qk[..., :spec.num_heads, :], qk[..., spec.num_heads:, :]
    if tables is not None:  # in place, one launch on q and k together
        ops.apply_rotary_(qk, *tables)
    return QKV(q, k, v, saved)


def qkv_grad_buffers(spec, lin, qkv):
    """(dy, (dq, dk, dv), dqk): dy (B, S, out) laid out like the projection output; dq, dk, dv where the
    attention backward writes its gradients, dqk the joint view of dq and dk. Without a q/k norm they are views
    into dy, so the input gradient is one GEMM `dy W` with no concatenation; with one, dq and dk go to their
    own buffer and the norm's backward writes dy's q/k part (qkv_backward)."""
    q = qkv.q
    dy = torch.empty(*q.shape[:2], lin.weight.shape[0], dtype=q.dtype, device=q.device)
    dq, dk, dv, dqk = split_qkv(spec, dy)
    if qkv.norm is not None:
        dqk = torch.empty(qkv.norm.pre.shape, dtype=q.dtype, device=q.device)
        dq, dk = dqk[..., :spec.num_heads, :], dqk[..., spec.num_heads:, :]
    return dy, (dq, dk, dv), dqk


def qkv_backward(spec, ops, lin, norm_parts, qkv, dy, dqk, tables):
    """Gradient of the layer's normed input (B, S, d) from dy and dqk of qkv_grad_buffers, filled by the
    attention backward: inverse rotary on dqk in place, the q/k norm's backward into dy, then dy W."""
    if tables is not None:
        ops.apply_rotary_(dqk, *tables, inverse=True)
    if qkv.norm is not None:
        dy_qk = split_qkv(spec, dy)[3]
        for p, rstd in zip(norm_parts, qkv.norm.rstd):
            ops.qk_norm_backward(qk_norm_view(dqk, p), qk_norm_view(qkv.norm.pre, p), p.weight, rstd,
                                 out=qk_norm_view(dy_qk, p))
    return linear_input_grad(dy, lin)


# ------------------------------------------------------------------ attention over all rows (layers >= 1)


class AttnSaved(NamedTuple):
    qkv: QKV
    o: torch.Tensor  # (B, S, H, D)
    lse: torch.Tensor  # (B, H, S) float32


def output_projection(o, lin, addend=None, in_place=False):
    """o (B, S, H, D) -> o Wo^T + b (B, S, d); with addend (B, S, d, contiguous) addend + o Wo^T in one GEMM,
    the bias not added (it is in addend: down_linears), written into addend itself when in_place."""
    if addend is None:
        return linear(o.flatten(2), lin)
    a2, o2 = addend.view(-1, addend.shape[-1]), o.reshape(-1, lin.weight.shape[1])
    if in_place:
        return a2.addmm_(o2, lin.weight.t()).view(addend.shape)
    return torch.addmm(a2, o2, lin.weight.t()).view(addend.shape)


def attention_forward(plan, i, a, addend=None):
    """Layer i >= 1, attention over all S rows. a (B, S, d) its input -> (out (B, S, d), AttnSaved).
    addend: the (B, S, d) MLP output of a parallel-residual layer, accumulated into in place."""
    spec, ops, rope = plan.spec, plan.ops, plan.ropes[i]
    tables = None if rope is None else rope.all
    qkv = qkv_forward(spec, ops, plan.qkv[i], plan.qk_norm[i], a, tables)
    o, lse = ops.attention_forward(qkv.q, qkv.k, qkv.v, plan.full_lengths, spec.attn_scale)
    return output_projection(o, spec.layers[i].o, addend, in_place=True), AttnSaved(qkv, o, lse)


def attention_backward(plan, i, g, saved):
    """Layer i >= 1: g (B, S, d) gradient of the attention output -> gradient of its input (B, S, d)."""
    spec, ops, rope = plan.spec, plan.ops, plan.ropes[i]
    qkv, o = saved.qkv, saved.o
    do = linear_input_grad(g, spec.layers[i].o).view(o.shape)
    dy, out, dqk = qkv_grad_buffers(spec, plan.qkv[i], qkv)
    ops.attention_backward(do, qkv.q, qkv.k, qkv.v, o, saved.lse, plan.full_lengths, spec.attn_scale, out=out)
    tables = None if rope is None else rope.all
    return qkv_backward(spec, ops, plan.qkv[i], plan.qk_norm[i], qkv, dy, dqk, tables)


class AttentionSublayer(NamedTuple):
    """How layers.layer_forward / layer_backward run a block's attention sublayer (its normed input through
    q/k/v, attention and the output projection, and back): `plan.attention`."""
    forward: Callable  # (plan, i, a (B, S, d), addend=None) -> (out (B, S, d), saved), as attention_forward
    backward: Callable  # (plan, i, g (B, S, d), saved) -> gradient of a (B, S, d), as attention_backward


# the engine's: in place on views of per-step buffers, the ops on the plan's backend (not differentiable)
IN_PLACE_ATTENTION = AttentionSublayer(attention_forward, attention_backward)


# ------------------------------------------------------------------ MLP


def mlp_forward(spec, ops, layer, b, down=None, out=None):
    """b (B, S, d) normed input -> (out (B, S, d), saved pre-activations). down: the down projection
    (default layer.down; see down_linears); out: a contiguous buffer of B*S*d elements it writes into."""
    if spec.activation in GATED:
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
    if spec.activation in GATED:
        d_gate, d_up = d_pre
        return torch.addmm(linear_input_grad(d_up, layer.up).flatten(0, -2), d_gate.flatten(0, -2),
                           layer.gate.weight).view(g.shape)
    return linear_input_grad(d_pre, layer.up)
