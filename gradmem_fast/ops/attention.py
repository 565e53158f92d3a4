"""Causal attention over [memory; context] for the write step, and the layer-0 reuse path.

Layout: q (B, S, Hq, D), k and v (B, S, Hkv, D) ("bshd", any strides with D contiguous), Hq a
multiple of Hkv (query head h reads kv head h // (Hq // Hkv)). `lengths` int32 (B,) counts the
valid rows of each sample (m + L_b): row i attends to keys j <= i with j < lengths[b]; rows
i >= lengths[b] output zeros, lse 0, and receive zero gradients. Lengths are clamped to [0, S]
on the device (no host check). lse is float32 (B, Hq, S), natural log.

Layer-0 reuse: the context rows' q/k/v at layer 0 do not depend on the memory, so the
context-over-context part of their attention is computed once per write
(`context_attention_state`) and merged each step with the memory keys
(`memory_attention_forward`); the backward returns only what the memory needs. See attention.md.
"""
import math
from typing import NamedTuple

import torch

from .._triton import triton_reason
from ..backends import OP_BACKENDS, check_op_backend, on_host, use_kernel
from .dtypes import acc_dtype

BACKENDS = OP_BACKENDS
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class ContextState(NamedTuple):
    """Softmax state of the context rows over context keys only (causal within the context).

    acc (B, T, Hq, D) float32: sum_j exp(s_ij - row_max_i) v_j, un-normalised.
    row_max (B, Hq, T) float32: max_j s_ij, s_ij = scale * q_i . k_j.
    row_sum (B, Hq, T) float32: sum_j exp(s_ij - row_max_i).
    Padded rows (t >= L_b) hold zeros in all three.
    """
    acc: torch.Tensor
    row_max: torch.Tensor
    row_sum: torch.Tensor


# ---------------------------------------------------------------- pure-PyTorch twins


def _expand_kv(x, group):
    """(B, S, Hkv, D) -> (B, Hq, S, D) in the accumulation dtype."""
    return x.transpose(1, 2).repeat_interleave(group, dim=1)


def _heads_first(x, acc):
    return x.transpose(1, 2).to(acc)


def _reduce_group(x, group):
    """(B, Hq, S, D) -> (B, S, Hkv, D), summing the query heads of each group."""
    B, Hq, S, D = x.shape
    return x.view(B, Hq // group, group, S, D).sum(2).transpose(1, 2)


def _causal_mask(lengths, S, device):
    """(B, 1, S, S) bool: key j visible to row i."""
    i = torch.arange(S, device=device)
    n = lengths.to(device=device, dtype=torch.int64).clamp(0, S)[:, None, None, None]
    return (i[None, None, None, :] <= i[None, None, :, None]) & (i[None, None, :, None] < n)


def attention_forward_reference(q, k, v, lengths, scale):
    """o (B, S, Hq, D) in q's dtype and lse (B, Hq, S) float32; see the module docstring."""
    acc = acc_dtype(q.dtype)
    group = q.shape[2] // k.shape[2]
    S = q.shape[1]
    qh = _heads_first(q, acc)
    kh = _expand_kv(k.to(acc), group)
    vh = _expand_kv(v.to(acc), group)
    mask = _causal_mask(lengths, S, q.device)
    scores = (qh @ kh.transpose(-1, -2) * scale).masked_fill(~mask, -math.inf)
    lse = torch.logsumexp(scores, dim=-1)  # -inf on padded rows
    valid = mask.any(-1)
    lse = torch.where(valid, lse, torch.zeros_like(lse))
    p = torch.exp(scores - lse[..., None])
    o = (p @ vh).transpose(1, 2).to(q.dtype)
    return o, lse.to(torch.float32)


def _attention_grads(do, q, k, v, o, lse, mask, scale, acc):
    """dq (B, Hq, S, D), dk and dv per query head, from the stored lse; `mask` (B, 1, S, Sk)."""
    group = q.shape[2] // k.shape[2]
    qh, doh, oh = _heads_first(q, acc), _heads_first(do, acc), _heads_first(o, acc)
    kh = _expand_kv(k.to(acc), group)
    vh = _expand_kv(v.to(acc), group)
    scores = (qh @ kh.transpose(-1, -2) * scale).masked_fill(~mask, -math.inf)
    p = torch.exp(scores - lse.to(acc)[..., None])
    delta = (doh * oh).sum(-1, keepdim=True)
    dv = p.transpose(-1, -2) @ doh
    ds = p * (doh @ vh.transpose(-1, -2) - delta)
    dq = ds @ kh * scale
    dk = ds.transpose(-1, -2) @ qh * scale
    return dq, dk, dv


def attention_backward_reference(do, q, k, v, o, lse, lengths, scale):
    """dq (B, S, Hq, D), dk and dv (B, S, Hkv, D) summed over each group, in q's dtype."""
    acc = acc_dtype(q.dtype)
    group = q.shape[2] // k.shape[2]
    mask = _causal_mask(lengths, q.shape[1], q.device)
    dq, dk, dv = _attention_grads(do, q, k, v, o, lse, mask, scale, acc)
    return (dq.transpose(1, 2).to(q.dtype), _reduce_group(dk, group).to(q.dtype),
            _reduce_group(dv, group).to(q.dtype))


def context_attention_state_reference(q_ctx, k_ctx, v_ctx, ctx_lengths, scale):
    """ContextState of the context rows over context keys; see ContextState."""
    acc = acc_dtype(q_ctx.dtype)
    group = q_ctx.shape[2] // k_ctx.shape[2]
    T = q_ctx.shape[1]
    mask = _causal_mask(ctx_lengths, T, q_ctx.device)
    qh = _heads_first(q_ctx, acc)
    scores = (qh @ _expand_kv(k_ctx.to(acc), group).transpose(-1, -2) * scale).masked_fill(~mask, -math.inf)
    valid = mask.any(-1)
    if T == 0:
        B, _, Hq, D = q_ctx.shape
        empty = q_ctx.new_zeros((B, Hq, 0), dtype=torch.float32)
        return ContextState(q_ctx.new_zeros((B, 0, Hq, D), dtype=torch.float32), empty, empty.clone())
    row_max = torch.where(valid, scores.amax(-1), torch.zeros((), dtype=acc, device=q_ctx.device))
    e = torch.exp(scores - row_max[..., None])
    acc_out = (e @ _expand_kv(v_ctx.to(acc), group)).transpose(1, 2)
    f32 = torch.float32
    return ContextState(acc_out.to(f32), row_max.to(f32), e.sum(-1).to(f32))


def _memory_row_lengths(q_mem):
    B, m = q_mem.shape[0], q_mem.shape[1]
    return torch.full((B,), m, dtype=torch.int32, device=q_mem.device)


def memory_attention_forward_reference(q_mem, k_mem, v_mem, q_ctx, state, ctx_lengths, scale):
    """o (B, m+T, Hq, D) in q's dtype and lse (B, Hq, m+T) float32 for [memory; context] rows."""
    acc = acc_dtype(q_mem.dtype)
    group = q_mem.shape[2] // k_mem.shape[2]
    T = q_ctx.shape[1]
    o_mem, lse_mem = attention_forward_reference(q_mem, k_mem, v_mem, _memory_row_lengths(q_mem), scale)
    s = _heads_first(q_ctx, acc) @ _expand_kv(k_mem.to(acc), group).transpose(-1, -2) * scale
    row_max = state.row_max.to(acc)
    top = torch.maximum(row_max, s.amax(-1))
    carry = torch.exp(row_max - top)
    e = torch.exp(s - top[..., None])
    total = state.row_sum.to(acc) * carry + e.sum(-1)
    num = state.acc.to(acc).transpose(1, 2) * carry[..., None] + e @ _expand_kv(v_mem.to(acc), group)
    valid = (torch.arange(T, device=q_ctx.device)[None, None, :]
             < ctx_lengths.to(torch.int64).clamp(0, T)[:, None, None])
    safe_total = torch.where(valid, total, torch.ones_like(total))
    o_ctx = torch.where(valid[..., None], num / safe_total[..., None], torch.zeros_like(num))
    lse_ctx = torch.where(valid, top + torch.log(safe_total), torch.zeros_like(top))
    o = torch.cat([o_mem, o_ctx.transpose(1, 2).to(q_mem.dtype)], dim=1)
    return o, torch.cat([lse_mem, lse_ctx.to(torch.float32)], dim=2)


def memory_attention_backward_reference(do, q_mem, k_mem, v_mem, q_ctx, o, lse, ctx_lengths, scale):
    """dq_mem (B, m, Hq, D), dk_mem and dv_mem (B, m, Hkv, D) in q's dtype, from all m+T rows."""
    acc = acc_dtype(q_mem.dtype)
    group = q_mem.shape[2] // k_mem.shape[2]
    B, m = q_mem.shape[0], q_mem.shape[1]
    T = q_ctx.shape[1]
    rows = torch.arange(m + T, device=q_mem.device)
    keys = torch.arange(m, device=q_mem.device)
    n = ctx_lengths.to(torch.int64).clamp(0, T)[:, None, None, None] + m
    mask = (keys[None, None, None, :] <= rows[None, None, :, None]) & (rows[None, None, :, None] < n)
    q_all = torch.cat([q_mem, q_ctx.to(q_mem.dtype)], dim=1)
    dq, dk, dv = _attention_grads(do, q_all, k_mem, v_mem, o, lse, mask, scale, acc)
    return (dq[:, :, :m].transpose(1, 2).to(q_mem.dtype), _reduce_group(dk, group).to(q_mem.dtype),
            _reduce_group(dv, group).to(q_mem.dtype))


# ---------------------------------------------------------------- validation and dispatch


def _shape(t):
    return tuple(t.shape)


def _check_tensor(name, t, ndim):
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-d, got shape {_shape(t)}")


def _check_qkv(q, k, v, names=("q", "k", "v")):
    for name, t in zip(names, (q, k, v)):
        _check_tensor(name, t, 4)
        if not t.is_floating_point():
            raise ValueError(f"{name} must be floating point, got {t.dtype}")
        if t.dtype != q.dtype:
            raise ValueError(f"{name} dtype {t.dtype} differs from {names[0]} dtype {q.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} on {t.device}, {names[0]} on {q.device}")
    B, S, Hq, D = q.shape
    if k.shape != v.shape:
        raise ValueError(f"{names[1]} shape {_shape(k)} differs from {names[2]} shape {_shape(v)}")
    if k.shape[0] != B or k.shape[1] != S or k.shape[3] != D:
        raise ValueError(f"{names[1]} shape {_shape(k)} does not match {names[0]} shape {_shape(q)} "
                         f"in (B, S, ., D)")
    Hkv = k.shape[2]
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"query heads {Hq} must be a positive multiple of kv heads {Hkv}")
    if D == 0:
        raise ValueError(f"head dim must be positive, got {D}")


def _check_lengths(name, lengths, B, device):
    _check_tensor(name, lengths, 1)
    if lengths.dtype != torch.int32:
        raise ValueError(f"{name} must be int32, got {lengths.dtype}")
    if lengths.shape[0] != B:
        raise ValueError(f"{name} must have shape ({B},), got {_shape(lengths)}")
    if lengths.device != device:
        raise ValueError(f"{name} on {lengths.device}, q on {device}")
    if B > 1 and lengths.stride(0) != 1:  # the kernels read one int32 per sample, stride 1
        raise ValueError(f"{name} must be contiguous, got stride {lengths.stride(0)}")


def _check_scale(scale):
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be a finite positive number, got {scale!r}")


def _check_like(name, t, shape, dtype, device):
    _check_tensor(name, t, len(shape))
    if tuple(t.shape) != tuple(shape) or t.dtype != dtype or t.device != device:
        raise ValueError(f"{name} must be {dtype} {tuple(shape)} on {device}, "
                         f"got {t.dtype} {_shape(t)} on {t.device}")


def _check_backend(backend):
    check_op_backend(backend)


def kernel_reason(*tensors):
    """None when the Triton attention kernels can take these (q-like, bshd) tensors, else why not."""
    why = triton_reason(*tensors)
    if why is not None:
        return why
    for t in tensors:
        if t.dtype not in KERNEL_DTYPES:
            return f"dtype {t.dtype} (the kernels take float32, float16, bfloat16)"
        if t.dim() == 4 and t.shape[-1] > 1 and t.stride(-1) != 1:
            return f"head dim not contiguous (stride {t.stride(-1)})"
    from ..kernels.attention_common import MAX_HEAD_DIM  # triton is importable here

    D = tensors[0].shape[-1]
    if D > MAX_HEAD_DIM or D % 16 != 0:
        return f"head dim {D} (the kernels take multiples of 16 up to {MAX_HEAD_DIM})"
    return None


def _use_kernel(backend, op, *tensors):
    why = kernel_reason(*tensors)
    if why is not None and why == triton_reason(*tensors):
        why = on_host(why)  # tensors where Triton does not run (CPU without the interpreter): the twin
    return use_kernel(backend, op, why, "Triton kernel")


def _fill(outs, results):
    if outs is None:
        return results
    return tuple(o.copy_(r) for o, r in zip(outs, results))


def _out_tuple(name, outs, n):
    if outs is None:
        return None
    if not isinstance(outs, (tuple, list)) or len(outs) != n:
        raise ValueError(f"{name} must be a tuple of {n} tensors")
    return tuple(outs)


# ---------------------------------------------------------------- public functions


def attention_forward(q, k, v, lengths, scale, *, out=None, backend="auto", validate=True):
    """Causal attention with ragged lengths and GQA: o (B, S, Hq, D) in q's dtype and lse (B, Hq, S)
    float32. `out=(o, lse)` reuses preallocated buffers (any strides, D / S contiguous)."""
    out = _out_tuple("out", out, 2)
    if validate:
        _check_qkv(q, k, v)
        _check_lengths("lengths", lengths, q.shape[0], q.device)
        _check_scale(scale)
        _check_backend(backend)
        if out is not None:
            B, S, Hq, _ = q.shape
            _check_like("out[0] (o)", out[0], q.shape, q.dtype, q.device)
            _check_like("out[1] (lse)", out[1], (B, Hq, S), torch.float32, q.device)
    if _use_kernel(backend, "attention_forward", q, k, v):
        from ..kernels import attention as K

        return K.attention_forward(q, k, v, lengths, float(scale), out=out)
    return _fill(out, attention_forward_reference(q, k, v, lengths, scale))


def attention_backward(do, q, k, v, o, lse, lengths, scale, *, out=None, backend="auto", validate=True):
    """dq (B, S, Hq, D), dk and dv (B, S, Hkv, D) in q's dtype (first order, input gradients only).
    `out=(dq, dk, dv)` reuses preallocated buffers."""
    out = _out_tuple("out", out, 3)
    if validate:
        _check_qkv(q, k, v)
        B, S, Hq, _ = q.shape
        _check_like("do", do, q.shape, q.dtype, q.device)
        _check_like("o", o, q.shape, q.dtype, q.device)
        _check_like("lse", lse, (B, Hq, S), torch.float32, q.device)
        _check_lengths("lengths", lengths, B, q.device)
        _check_scale(scale)
        _check_backend(backend)
        if out is not None:
            for name, t, ref in zip(("out[0] (dq)", "out[1] (dk)", "out[2] (dv)"), out, (q, k, v)):
                _check_like(name, t, ref.shape, ref.dtype, ref.device)
    if _use_kernel(backend, "attention_backward", q, k, v, do, o):
        from ..kernels import attention as K

        return K.attention_backward(do, q, k, v, o, lse, lengths, float(scale), out=out)
    return _fill(out, attention_backward_reference(do, q, k, v, o, lse, lengths, scale))


class _WriteAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, lengths, scale, backend):
        o, lse = attention_forward(q, k, v, lengths, scale, backend=backend, validate=False)
        ctx.save_for_backward(q, k, v, o, lse, lengths)
        ctx.scale = scale
        ctx.backend = backend
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, lengths = ctx.saved_tensors
        if do.stride(-1) != 1:
            do = do.contiguous()
        dq, dk, dv = attention_backward(do, q, k, v, o, lse, lengths, ctx.scale, backend=ctx.backend,
                                        validate=False)
        return dq, dk, dv, None, None, None


def write_attention(q, k, v, lengths, scale, *, backend="auto", validate=True):
    """o = causal attention (B, S, Hq, D), differentiable (first order) in q, k and v."""
    if validate:
        _check_qkv(q, k, v)
        _check_lengths("lengths", lengths, q.shape[0], q.device)
        _check_scale(scale)
        _check_backend(backend)
    return _WriteAttention.apply(q, k, v, lengths, float(scale), backend)


def _check_memory_args(q_mem, k_mem, v_mem, q_ctx, ctx_lengths, scale, backend):
    _check_qkv(q_mem, k_mem, v_mem, ("q_mem", "k_mem", "v_mem"))
    _check_tensor("q_ctx", q_ctx, 4)
    B, m, Hq, D = q_mem.shape
    if q_ctx.dtype != q_mem.dtype or q_ctx.device != q_mem.device:
        raise ValueError(f"q_ctx is {q_ctx.dtype} on {q_ctx.device}, q_mem {q_mem.dtype} on {q_mem.device}")
    if q_ctx.shape[0] != B or q_ctx.shape[2] != Hq or q_ctx.shape[3] != D:
        raise ValueError(f"q_ctx shape {_shape(q_ctx)} does not match q_mem shape {_shape(q_mem)} "
                         f"in (B, ., Hq, D)")
    if m == 0:
        raise ValueError("q_mem must hold at least one memory row (m >= 1)")
    _check_lengths("ctx_lengths", ctx_lengths, B, q_mem.device)
    _check_scale(scale)
    _check_backend(backend)


def context_attention_state(q_ctx, k_ctx, v_ctx, ctx_lengths, scale, *, out=None, backend="auto",
                            validate=True):
    """Once per write: the context rows' softmax state over context keys (ContextState).
    `out=ContextState(...)` reuses preallocated buffers."""
    out = _out_tuple("out", out, 3)
    if validate:
        _check_qkv(q_ctx, k_ctx, v_ctx, ("q_ctx", "k_ctx", "v_ctx"))
        B, T, Hq, D = q_ctx.shape
        _check_lengths("ctx_lengths", ctx_lengths, B, q_ctx.device)
        _check_scale(scale)
        _check_backend(backend)
        if out is not None:
            _check_like("out.acc", out[0], (B, T, Hq, D), torch.float32, q_ctx.device)
            _check_like("out.row_max", out[1], (B, Hq, T), torch.float32, q_ctx.device)
            _check_like("out.row_sum", out[2], (B, Hq, T), torch.float32, q_ctx.device)
    if _use_kernel(backend, "context_attention_state", q_ctx, k_ctx, v_ctx):
        from ..kernels import attention as K

        return ContextState(*K.context_attention_state(q_ctx, k_ctx, v_ctx, ctx_lengths, float(scale), out=out))
    return ContextState(*_fill(out, context_attention_state_reference(q_ctx, k_ctx, v_ctx, ctx_lengths, scale)))


def memory_attention_forward(q_mem, k_mem, v_mem, q_ctx, state, ctx_lengths, scale, *, out=None,
                             backend="auto", validate=True):
    """Per step, O(S*m): o (B, m+T, Hq, D) and lse (B, Hq, m+T) float32 for [memory; context] rows,
    equal to attention_forward on the concatenated rows with lengths m + ctx_lengths."""
    out = _out_tuple("out", out, 2)
    if validate:
        _check_memory_args(q_mem, k_mem, v_mem, q_ctx, ctx_lengths, scale, backend)
        B, m, Hq, D = q_mem.shape
        T = q_ctx.shape[1]
        if not isinstance(state, tuple) or len(state) != 3:
            raise ValueError("state must be a ContextState (acc, row_max, row_sum)")
        _check_like("state.acc", state[0], (B, T, Hq, D), torch.float32, q_mem.device)
        _check_like("state.row_max", state[1], (B, Hq, T), torch.float32, q_mem.device)
        _check_like("state.row_sum", state[2], (B, Hq, T), torch.float32, q_mem.device)
        if out is not None:
            _check_like("out[0] (o)", out[0], (B, m + T, Hq, D), q_mem.dtype, q_mem.device)
            _check_like("out[1] (lse)", out[1], (B, Hq, m + T), torch.float32, q_mem.device)
    if _use_kernel(backend, "memory_attention_forward", q_mem, k_mem, v_mem, q_ctx):
        from ..kernels import attention_layer0 as K

        return K.memory_attention_forward(q_mem, k_mem, v_mem, q_ctx, ContextState(*state), ctx_lengths,
                                          float(scale), out=out)
    return _fill(out, memory_attention_forward_reference(q_mem, k_mem, v_mem, q_ctx, ContextState(*state),
                                                         ctx_lengths, scale))


def memory_attention_backward(do, q_mem, k_mem, v_mem, q_ctx, o, lse, ctx_lengths, scale, *, out=None,
                              backend="auto", validate=True):
    """dq_mem (B, m, Hq, D), dk_mem and dv_mem (B, m, Hkv, D): the memory rows' input gradients from
    all m+T query rows. Context-row gradients are not computed (constant within a write)."""
    out = _out_tuple("out", out, 3)
    if validate:
        _check_memory_args(q_mem, k_mem, v_mem, q_ctx, ctx_lengths, scale, backend)
        B, m, Hq, D = q_mem.shape
        S = m + q_ctx.shape[1]
        _check_like("do", do, (B, S, Hq, D), q_mem.dtype, q_mem.device)
        _check_like("o", o, (B, S, Hq, D), q_mem.dtype, q_mem.device)
        _check_like("lse", lse, (B, Hq, S), torch.float32, q_mem.device)
        if out is not None:
            for name, t, ref in zip(("out[0] (dq_mem)", "out[1] (dk_mem)", "out[2] (dv_mem)"), out,
                                    (q_mem, k_mem, v_mem)):
                _check_like(name, t, ref.shape, ref.dtype, ref.device)
    if _use_kernel(backend, "memory_attention_backward", q_mem, k_mem, v_mem, q_ctx, do, o):
        from ..kernels import attention_layer0 as K

        return K.memory_attention_backward(do, q_mem, k_mem, v_mem, q_ctx, o, lse, ctx_lengths, float(scale),
                                           out=out)
    return _fill(out, memory_attention_backward_reference(do, q_mem, k_mem, v_mem, q_ctx, o, lse, ctx_lengths,
                                                          scale))
