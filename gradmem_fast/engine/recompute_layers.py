"""The per-layer forward and input-gradient backward of layers.py, out of place, for autograd.

layers.py and sublayers.py rotate q/k in place on views of one projection output and writes dq/dk/dv into views of one
buffer; autograd refuses in-place writes into views that `split` returns. These functions compute the
same values with the same ops and formulas (engine.md, "A layer"), but every rotation acts on a copy
and the q/k/v gradient is assembled by concatenation, so a step built from them can be differentiated.
Attention runs as ops.attention_double_backward's ops: its forward and backward save only q, k, v (and do),
not the (S x S) probabilities, and the backward's own derivative is the written-out double backward (the
twin of a flash-style kernel); its backward recomputes o and lse instead of reading the forward's.
Shapes: (B, S, d) streams, q (B, S, H, D), k and v (B, S, Hkv, D).
"""
import torch

from ..ops.attention_double_backward import attention_backward_op, attention_op
from ..models.forward import linear
from ..models.qkv import split_qkv
from .sublayers import linear_input_grad, mlp_backward, mlp_forward, output_projection


def _rotate(spec, ops, x, rope, inverse=False):
    """Rotary on a copy of x (B, S, H, D); x itself when the model has no rotary."""
    if spec.rotary is None:
        return x
    return ops.apply_rotary_(x.clone(), rope.cos_all, rope.sin_all, spec.rotary, inverse=inverse)


def _qkv_gradient(spec, dq, dk, dv):
    """dq, dk, dv -> dy (B, S, out) laid out like the projection output (layers._split_qkv)."""
    if spec.qkv_layout == "per_head":
        return torch.stack((dq, dk, dv), dim=-2).flatten(-3)
    return torch.cat((dq.flatten(-2), dk.flatten(-2), dv.flatten(-2)), dim=-1)


def attention_block_forward(plan, i, a, addend=None):
    """a (B, S, d) normed input -> (o Wo^T + b, or addend + o Wo^T without the bias; saved)."""
    spec, ops, layer = plan.spec, plan.ops, plan.spec.layers[i]
    q, k, v, _ = split_qkv(spec, linear(a, plan.qkv[i]))
    q, k = _rotate(spec, ops, q, plan.rope), _rotate(spec, ops, k, plan.rope)
    o = attention_op(q, k, v, plan.full_lengths, spec.attn_scale, validate=False)
    return output_projection(o, layer.o, addend), (q, k, v, o.shape)


def attention_block_backward(plan, i, g, saved):
    spec, ops, layer = plan.spec, plan.ops, plan.spec.layers[i]
    q, k, v, o_shape = saved
    do = linear_input_grad(g, layer.o).view(o_shape)
    dq, dk, dv = attention_backward_op(q, k, v, do, plan.full_lengths, spec.attn_scale, validate=False)
    dq = _rotate(spec, ops, dq, plan.rope, inverse=True)
    dk = _rotate(spec, ops, dk, plan.rope, inverse=True)
    return linear_input_grad(_qkv_gradient(spec, dq, dk, dv), plan.qkv[i])


def layer_forward(plan, i, pending, h):
    """Layer i: (pending, h) -> (pending', h', saved), as layers.layer_forward."""
    spec, ops, layer = plan.spec, plan.ops, plan.spec.layers[i]
    a, h1, s1 = ops.add_norm_forward(pending, h, layer.attn_norm, spec.norm_kind)
    if spec.parallel_residual:
        b, _, s2 = ops.add_norm_forward(h1, None, layer.mlp_norm, spec.norm_kind)
        mlp_out, pre = mlp_forward(spec, ops, layer, b, down=plan.down[i])
        out, attn_saved = attention_block_forward(plan, i, a, addend=mlp_out)
        return out, h1, (h1, s1, attn_saved, s2, pre)
    attn_out, attn_saved = attention_block_forward(plan, i, a)
    b, h2, s2 = ops.add_norm_forward(attn_out, h1, layer.mlp_norm, spec.norm_kind)
    mlp_out, pre = mlp_forward(spec, ops, layer, b)
    return mlp_out, h2, (h1, s1, attn_saved, h2, s2, pre)


def layer_backward(plan, i, g, saved):
    """g (B, S, d) gradient of the stream after layer i -> gradient of the stream before it."""
    spec, ops, layer = plan.spec, plan.ops, plan.spec.layers[i]
    if spec.parallel_residual:
        h1, s1, attn_saved, s2, pre = saved
        d_b = mlp_backward(spec, ops, layer, g, pre)
        d_a = attention_block_backward(plan, i, g, attn_saved)
        g1 = ops.add_norm_backward(d_a, g, h1, layer.attn_norm, s1, spec.norm_kind)
        return ops.add_norm_backward(d_b, g1, h1, layer.mlp_norm, s2, spec.norm_kind)
    h1, s1, attn_saved, h2, s2, pre = saved
    d_b = mlp_backward(spec, ops, layer, g, pre)
    g2 = ops.add_norm_backward(d_b, g, h2, layer.mlp_norm, s2, spec.norm_kind)
    d_a = attention_block_backward(plan, i, g2, attn_saved)
    return ops.add_norm_backward(d_a, g2, h1, layer.attn_norm, s1, spec.norm_kind)
