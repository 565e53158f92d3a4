"""Attention's backward as a differentiable op, with its double backward written out (derivation:
attention_double_backward.md); Triton kernels in kernels/attention_double_backward.py, PyTorch twins here.

    dq, dk, dv = attention_backward_op(q, k, v, do, lengths, scale)

is the input gradient of causal attention o = softmax(scale * q k^T + mask) v with ragged lengths and GQA
(layout and masking as ops.attention: q (B, S, Hq, D), k and v (B, S, Hkv, D), lengths (B,) int32). The
forward's o and lse are recomputed inside, not taken as inputs, so the op's own vector-Jacobian product is
the total second-order product with respect to q, k, v and do. `attention_op(q, k, v, lengths, scale)` is
the attention forward whose backward is attention_backward_op: differentiable twice.

backend: "auto" (the Triton kernels where they can run: ops.attention.kernel_reason), "kernel" (RuntimeError
where they cannot), "reference" (the twins). The kernels recompute P block by block and never hold an
(S x S) tensor; their autograd nodes save q, k, v, do, o and lse. The twins materialise P per head and save
q, k, v and do. Under create_graph (a third derivative) the double backward runs on the twin.
"""
import math

import torch

from ..backends import check_op_backend


def _acc_dtype(t):
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _expand(x, group, acc):
    """(B, S, Hkv, D) -> (B, Hq, S, D) in the accumulation dtype."""
    return x.transpose(1, 2).to(acc).repeat_interleave(group, dim=1)


def _reduce(x, group, dtype):
    """(B, Hq, S, D) -> (B, S, Hkv, D), the query heads of each group summed."""
    B, Hq, S, D = x.shape
    return x.view(B, Hq // group, group, S, D).sum(2).transpose(1, 2).to(dtype)


def _probabilities(qh, kh, lengths, scale):
    """P (B, Hq, S, S): row i over keys j <= i, j < lengths[b]; rows i >= lengths[b] are zero."""
    S = qh.shape[2]
    i = torch.arange(S, device=qh.device)
    n = lengths.to(device=qh.device, dtype=torch.int64).clamp(0, S)[:, None, None, None]
    mask = (i[None, None, None, :] <= i[None, None, :, None]) & (i[None, None, :, None] < n)
    scores = (qh @ kh.transpose(-1, -2) * scale).masked_fill(~mask, -math.inf)
    lse = torch.logsumexp(scores, dim=-1, keepdim=True)
    lse = torch.where(mask.any(-1, keepdim=True), lse, torch.zeros_like(lse))
    return torch.exp(scores - lse)


def _heads(q, k, v, do):
    acc = _acc_dtype(q)
    group = q.shape[2] // k.shape[2]
    return acc, group, q.transpose(1, 2).to(acc), _expand(k, group, acc), _expand(v, group, acc), \
        do.transpose(1, 2).to(acc)


def attention_op_forward_reference(q, k, v, lengths, scale):
    """o (B, S, Hq, D) in q's dtype, computed in float32 (float64 for float64 inputs)."""
    acc, group, qh, kh, vh, _ = _heads(q, k, v, q)
    p = _probabilities(qh, kh, lengths, scale)
    return (p @ vh).transpose(1, 2).to(q.dtype)


def attention_op_backward_reference(q, k, v, do, lengths, scale):
    """(dq (B, S, Hq, D), dk, dv (B, S, Hkv, D)): D_i = sum(do_i o_i), dS = P (do v^T - D),
    dq = scale dS k, dk = scale dS^T q, dv = P^T do (summed over each GQA group)."""
    acc, group, qh, kh, vh, doh = _heads(q, k, v, do)
    p = _probabilities(qh, kh, lengths, scale)
    dp = doh @ vh.transpose(-1, -2)
    delta = (p * dp).sum(-1, keepdim=True)  # = sum_d do * o, with o = P v
    ds = p * (dp - delta)
    dq = (ds @ kh * scale).transpose(1, 2).to(q.dtype)
    return dq, _reduce(ds.transpose(-1, -2) @ qh * scale, group, k.dtype), _reduce(p.transpose(-1, -2) @ doh,
                                                                                   group, v.dtype)


def attention_double_backward_reference(q, k, v, do, lengths, scale, gq, gk, gv):
    """Cotangents (of q, k, v, do) of <gq, dq> + <gk, dk> + <gv, dv>, with (dq, dk, dv) the attention
    backward at (q, k, v, do); gq like q, gk and gv like k. Every step is in attention_double_backward.md."""
    acc, group, qh, kh, vh, doh = _heads(q, k, v, do)
    gqh, gkh, gvh = gq.transpose(1, 2).to(acc), _expand(gk, group, acc), _expand(gv, group, acc)
    p = _probabilities(qh, kh, lengths, scale)
    dp = doh @ vh.transpose(-1, -2)
    oh = p @ vh
    delta = (p * dp).sum(-1, keepdim=True)
    ds = p * (dp - delta)
    ds_bar = scale * (gqh @ kh.transpose(-1, -2) + qh @ gkh.transpose(-1, -2))  # cotangent of dS
    delta_bar = -(p * ds_bar).sum(-1, keepdim=True)  # of D (per row)
    dp_bar = p * ds_bar  # of dP
    o_bar = delta_bar * doh  # of o, through D = sum(do o)
    p_bar = ds_bar * (dp - delta) + doh @ gvh.transpose(-1, -2) + o_bar @ vh.transpose(-1, -2)
    s_bar = p * (p_bar - (p * p_bar).sum(-1, keepdim=True))  # through the softmax
    q_bar = scale * (ds @ gkh + s_bar @ kh)
    k_bar = scale * (ds.transpose(-1, -2) @ gqh + s_bar.transpose(-1, -2) @ qh)
    v_bar = dp_bar.transpose(-1, -2) @ doh + p.transpose(-1, -2) @ o_bar
    do_bar = delta_bar * oh + dp_bar @ vh + p @ gvh
    return (q_bar.transpose(1, 2).to(q.dtype), _reduce(k_bar, group, k.dtype), _reduce(v_bar, group, v.dtype),
            do_bar.transpose(1, 2).to(do.dtype))




def _kernel_state(q, k, v, lengths, scale):
    """(o, lse) from the first-order forward kernel (o in q's dtype, lse (B, Hq, S) float32)."""
    from ..kernels.attention import attention_forward as launch

    return launch(q, k, v, lengths, scale)


class _AttentionBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, do, lengths, scale, use_kernel, o, lse):
        ctx.scale, ctx.use_kernel = scale, use_kernel
        if not use_kernel:
            ctx.save_for_backward(q, k, v, do, lengths)
            return attention_op_backward_reference(q, k, v, do, lengths, scale)
        from ..kernels.attention import attention_backward as launch

        if o is None:
            o, lse = _kernel_state(q, k, v, lengths, scale)
        ctx.save_for_backward(q, k, v, do, lengths, o, lse)
        return launch(do.contiguous(), q, k, v, o, lse, lengths, scale)

    @staticmethod
    def backward(ctx, gq, gk, gv):
        q, k, v, do, lengths = ctx.saved_tensors[:5]
        gq, gk, gv = (torch.zeros_like(t) if g is None else g.to(t.dtype) for g, t in ((gq, q), (gk, k), (gv, v)))
        if ctx.use_kernel and not torch.is_grad_enabled():
            from ..kernels.attention_double_backward import attention_double_backward as launch

            o, lse = ctx.saved_tensors[5:]
            bars = launch(q, k, v, do, o, lse, lengths, ctx.scale, gq, gk, gv)
        else:
            bars = attention_double_backward_reference(q, k, v, do, lengths, ctx.scale, gq, gk, gv)
        return (*bars, None, None, None, None, None)


class _Attention(torch.autograd.Function):
    """(o, lse): lse (B, Hq, S) float32 on the kernels, an empty tensor on the twin; not differentiable."""

    @staticmethod
    def forward(ctx, q, k, v, lengths, scale, use_kernel):
        ctx.scale, ctx.use_kernel = scale, use_kernel
        if not use_kernel:
            ctx.save_for_backward(q, k, v, lengths)
            lse = q.new_empty(0, dtype=torch.float32)
            ctx.mark_non_differentiable(lse)
            return attention_op_forward_reference(q, k, v, lengths, scale), lse
        o, lse = _kernel_state(q, k, v, lengths, scale)
        ctx.save_for_backward(q, k, v, lengths, o, lse)
        ctx.mark_non_differentiable(lse)
        return o, lse

    @staticmethod
    def backward(ctx, do, _):
        q, k, v, lengths = ctx.saved_tensors[:4]
        o, lse = (t.detach() for t in ctx.saved_tensors[4:]) if ctx.use_kernel else (None, None)
        return (*_AttentionBackward.apply(q, k, v, do, lengths, ctx.scale, ctx.use_kernel, o, lse), None, None,
                None)


def _check(q, k, v, lengths, scale, do=None):
    for name, t in (("q", q), ("k", k), ("v", v)) + ((("do", do),) if do is not None else ()):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a 4-D tensor (B, S, H, D), got {getattr(t, 'shape', type(t))}")
    if k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} do not fit together")
    if q.shape[2] % k.shape[2] != 0:
        raise ValueError(f"query heads {q.shape[2]} are not a multiple of key/value heads {k.shape[2]}")
    if do is not None and do.shape != q.shape:
        raise ValueError(f"do shape {tuple(do.shape)} != q shape {tuple(q.shape)}")
    for name, t in (("k", k), ("v", v)) + ((("do", do),) if do is not None else ()):
        if t.dtype != q.dtype or t.device != q.device:
            raise ValueError(f"{name} is {t.dtype} on {t.device}, q {q.dtype} on {q.device}")
    if not isinstance(lengths, torch.Tensor) or lengths.shape != (q.shape[0],) or lengths.is_floating_point():
        raise ValueError(f"lengths must be an integer tensor of shape ({q.shape[0]},)")
    if lengths.device != q.device:
        raise ValueError(f"lengths is on {lengths.device}, q on {q.device}")
    if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a positive finite number, got {scale!r}")


def _use_kernel(backend, op, *tensors):
    from .attention import _use_kernel as attention_use_kernel

    return attention_use_kernel(check_op_backend(backend), op, *tensors)


def _lengths(lengths):
    """lengths as the kernels read them: int32, one element per sample, contiguous."""
    return lengths.to(torch.int32).contiguous()


def attention_backward_op(q, k, v, do, lengths, scale, *, state=None, backend="auto", validate=True):
    """(dq, dk, dv), differentiable: its backward is the double backward (kernels or twin, by backend).
    state: the forward's state for these q, k, v from attention_op_with_state (the kernels then skip
    recomputing o and lse), or None."""
    if validate:
        _check(q, k, v, lengths, scale, do)
    use = _use_kernel(backend, "attention_backward_op", q, k, v, do)
    o, lse = state if use and state is not None else (None, None)
    return _AttentionBackward.apply(q, k, v, do, _lengths(lengths), float(scale), use, o, lse)


def attention_op_with_state(q, k, v, lengths, scale, *, backend="auto", validate=True):
    """(o, state): attention_op's o and what attention_backward_op can reuse for the same q, k, v (the
    kernels' detached o and lse; None on the twins)."""
    if validate:
        _check(q, k, v, lengths, scale)
    use = _use_kernel(backend, "attention_op", q, k, v)
    o, lse = _Attention.apply(q, k, v, _lengths(lengths), float(scale), use)
    return o, ((o.detach(), lse) if use else None)


def attention_op(q, k, v, lengths, scale, *, backend="auto", validate=True):
    """o, differentiable twice: backward attention_backward_op, double backward the explicit formulas."""
    return attention_op_with_state(q, k, v, lengths, scale, backend=backend, validate=validate)[0]


__all__ = ["attention_backward_op", "attention_double_backward_reference", "attention_op",
           "attention_op_backward_reference", "attention_op_forward_reference", "attention_op_with_state"]
