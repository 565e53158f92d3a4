"""The attention sublayer of layers.py out of place, for the recomputed step of a second-order write.

layers.layer_forward / layer_backward take their attention sublayer from the plan (sublayers.AttentionSublayer);
recompute.py gives them this one, so a recomputed step runs the engine's own block structures (pre-norm,
post-norm, sandwich, parallel) with only the attention sublayer swapped. The engine's (sublayers.attention_forward
/ attention_backward) norms q and k into a shared buffer, rotates them in place on views of one projection
output and lets the attention backward write dq, dk, dv into views of one gradient buffer: autograd refuses
in-place writes into the views that `split` returns, and the engine's attention ops have no derivative.
These functions compute the same values with the same ops and formulas (engine.md, "A layer"; ops/qk_norm.md),
but the q/k norm's parts are joined by concatenation, every rotation acts on a copy and the q/k/v gradient is
assembled by concatenation. Attention runs as ops.attention_double_backward's ops, on the write's op backend
(plan.ops.op_backend): they save q, k, v (and do; o and lse on the kernels, computed once by the forward and
reused by the backward op), never the (S x S) probabilities, and
the backward's own derivative is the written-out double backward (flash-style Triton kernels, or the twin).
The q/k norm runs as ops.norm_double_backward's qk_norm_op / qk_norm_backward_op on the same backend (the
backward recomputes rstd from its input), rotary on the twin (linear, its tables constant).

The plan (recompute.RecomputePlan) holds per layer: qkv (the fused projection, sublayers.qkv_linears), qk_norm
(sublayers.qk_norm_parts or None) and tables ((cos, sin, rotary) for all S rows, or None).
Shapes: a (B, S, d); q (B, S, H, D), k and v (B, S, Hkv, D); qk (B, S, H + Hkv, D) q and k together.
"""
from typing import NamedTuple, Optional

import torch

from ..models.forward import linear
from ..models.qkv import split_qkv
from ..ops.attention_double_backward import attention_backward_op, attention_op_with_state
from ..ops.norm_double_backward import qk_norm_backward_op, qk_norm_op
from .sublayers import AttentionSublayer, linear_input_grad, output_projection, qk_norm_view


class RecomputedAttention(NamedTuple):
    """What the out-of-place attention sublayer saves for its backward."""
    q: torch.Tensor  # (B, S, H, D) attention inputs: normed (when the model norms them) and rotated
    k: torch.Tensor  # (B, S, Hkv, D)
    v: torch.Tensor  # (B, S, Hkv, D)
    qk_pre_norm: Optional[torch.Tensor]  # (B, S, H + Hkv, D) q and k before their norm; None without one
    qk_rstd: Optional[tuple]  # per sublayers.QKNormPart, the rstd qk_norm_op returned (values for the backward)
    o_shape: torch.Size  # (B, S, H, D)
    state: Optional[tuple]  # the kernels' (o, lse) for attention_backward_op (attention_op_with_state), or None


def _rotate(ops, x, tables, inverse=False):
    """Rotary on a copy of x (B, S, heads, D); x itself when the layer has no rotary (tables None)."""
    if tables is None:
        return x
    cos, sin, rotary = tables
    return ops.apply_rotary_(x.clone(), cos, sin, rotary, inverse=inverse)


def _heads(part_out, part):
    """A q/k norm part's (B, S, G, D') result back as heads (B, S, stop - start, D)."""
    return part_out.reshape(*part_out.shape[:-2], part.stop - part.start, -1)


def _qk_norm(parts, qk, backend):
    """qk (B, S, H + Hkv, D) -> (normed qk, a new tensor; rstd per part), one qk_norm_op per QKNormPart."""
    normed = [qk_norm_op(qk_norm_view(qk, p), p.weight, p.eps, backend=backend, validate=False) for p in parts]
    return torch.cat([_heads(y, p) for (y, _), p in zip(normed, parts)], dim=-2), tuple(r for _, r in normed)


def _qk_norm_backward(parts, d_qk, pre, rstd, backend):
    """d_qk (B, S, H + Hkv, D) gradient of the normed q and k -> gradient of q and k before the norm (each
    part's rstd taken as values; qk_norm_backward_op's derivatives recompute it, so they are total)."""
    return torch.cat([_heads(qk_norm_backward_op(qk_norm_view(d_qk, p), qk_norm_view(pre, p), p.weight, p.eps,
                                                 rstd=r, backend=backend, validate=False), p)
                      for p, r in zip(parts, rstd)], dim=-2)


def _qkv_gradient(spec, dq, dk, dv):
    """dq, dk, dv -> dy (B, S, out) laid out like the projection output (models.qkv.split_qkv)."""
    if spec.qkv_layout == "per_head":
        return torch.stack((dq, dk, dv), dim=-2).flatten(-3)
    return torch.cat((dq.flatten(-2), dk.flatten(-2), dv.flatten(-2)), dim=-1)


def attention_forward(plan, i, a, addend=None):
    """Layer i, attention over all S rows: a (B, S, d) normed input -> (o Wo^T + b, or addend + o Wo^T without
    the bias (it is in addend: sublayers.down_linears); RecomputedAttention)."""
    spec, ops, H = plan.spec, plan.ops, plan.spec.num_heads
    q, k, v, qk = split_qkv(spec, linear(a, plan.qkv[i]))
    pre = rstd = None
    if plan.qk_norm[i] is not None:
        pre = qk
        qk, rstd = _qk_norm(plan.qk_norm[i], qk, plan.ops.op_backend)
        q, k = qk[..., :H, :], qk[..., H:, :]
    q, k = _rotate(ops, q, plan.tables[i]), _rotate(ops, k, plan.tables[i])
    o, state = attention_op_with_state(q, k, v, plan.full_lengths, spec.attn_scale,
                                       backend=plan.ops.op_backend, validate=False)
    return output_projection(o, spec.layers[i].o, addend), RecomputedAttention(q, k, v, pre, rstd, o.shape, state)


def attention_backward(plan, i, g, saved):
    """g (B, S, d) gradient of the attention output -> gradient of its normed input a (B, S, d)."""
    spec, ops, H = plan.spec, plan.ops, plan.spec.num_heads
    do = linear_input_grad(g, spec.layers[i].o).view(saved.o_shape)
    dq, dk, dv = attention_backward_op(saved.q, saved.k, saved.v, do, plan.full_lengths, spec.attn_scale,
                                       state=saved.state, backend=plan.ops.op_backend, validate=False)
    dq = _rotate(ops, dq, plan.tables[i], inverse=True)
    dk = _rotate(ops, dk, plan.tables[i], inverse=True)
    if saved.qk_pre_norm is not None:
        d_qk = _qk_norm_backward(plan.qk_norm[i], torch.cat((dq, dk), dim=-2), saved.qk_pre_norm, saved.qk_rstd,
                                 plan.ops.op_backend)
        dq, dk = d_qk[..., :H, :], d_qk[..., H:, :]
    return linear_input_grad(_qkv_gradient(spec, dq, dk, dv), plan.qkv[i])


# the recompute's: out of place, on the ops' twins and the twice-differentiable attention ops
OUT_OF_PLACE_ATTENTION = AttentionSublayer(attention_forward, attention_backward)
