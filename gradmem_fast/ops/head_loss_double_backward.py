"""Fused LM head + cross-entropy as a differentiable op whose backward forms the second-order products
without logits (derivation: head_loss_double_backward.md).

    loss_rows, grad_rows = head_loss_op(hidden, weight, targets, row_weights)

has the values of `fused_head_loss` (ops/head_loss.py): loss_rows (N,) float32 (float64 for float64
inputs), lse - z_t, 0 where the row weight is 0; grad_rows (N, d) in hidden's dtype, the gradient of
sum_r w_r loss_r with respect to hidden. Unlike `fused_head_loss` it is differentiable: its backward
takes the cotangents (loss_bar of loss_rows, grad_bar of grad_rows) and returns those of hidden and of
weight. targets and row_weights are constants (row_weights requiring grad is a ValueError).

The forward runs the first-order op (its all-Triton "fused" method where the kernels can run, the twin
elsewhere) and saves hidden, weight, targets, row_weights and the per-row log-sum-exp (N floats). The
backward, `head_loss_double_backward` (Triton kernels where they can run, else the twin), recomputes the
logits a vocabulary block at a time in two passes; no (N, V) tensor exists. Under create_graph=True (a
third derivative) the backward is the twin under autograd instead, its lse recomputed in the graph.
"""
import torch

from ..backends import OP_BACKENDS, on_host, use_kernel
from .dtypes import acc_dtype
from .head_loss import _check as _check_head_loss
from .head_loss import fused_head_loss_reference
from .head_loss import kernel_reason as _first_order_reason

BACKENDS = OP_BACKENDS
# columns per chunk of the twin are chosen so that one (rows, columns) chunk holds at most this many elements
_REFERENCE_CHUNK_ELEMENTS = 1 << 22


def _chunk_columns(rows, V, chunk_columns):
    if chunk_columns is None:
        chunk_columns = _REFERENCE_CHUNK_ELEMENTS // max(rows, 1)
    return max(1, min(V, chunk_columns))


def _blockwise_lse(h, W, C):
    """log sum_v exp(h W^T) (rows,), a chunk of C vocabulary columns at a time; differentiable."""
    lse = None
    for start in range(0, W.shape[0], C):
        chunk = torch.logsumexp(h @ W[start:start + C].t(), dim=1)
        lse = chunk if lse is None else torch.logaddexp(lse, chunk)
    return lse


def head_loss_double_backward_reference(hidden, weight, targets, row_weights, lse, loss_bar, grad_bar, *,
                                        need_hidden=True, need_weight=True, chunk_columns=None):
    """Pure PyTorch twin of `head_loss_double_backward`: (hidden_bar (N, d) in hidden's dtype or None,
    weight_bar (V, d) in weight's dtype or None), computed in float32 (float64 for float64 inputs) over
    chunks of `chunk_columns` vocabulary columns (default: chunks of at most 2**22 elements).

    lse (N,): the rows' log-sum-exp from the forward (read on rows with nonzero weight), or None to
    recompute it here, blockwise and differentiably (then the result is differentiable in hidden and
    weight through every term, for a third derivative)."""
    ct = acc_dtype(hidden.dtype)
    N, V = hidden.shape[0], weight.shape[0]
    C = _chunk_columns(N, V, chunk_columns)
    active = row_weights != 0
    zero = torch.zeros((), dtype=ct, device=hidden.device)
    # rows of zero weight are constants: their inputs (hidden may be NaN there, targets out of range) are
    # replaced before any arithmetic, so nothing of theirs reaches a result or a gradient
    w = torch.where(active, row_weights.to(ct), zero)
    t = torch.where(active, targets, torch.zeros_like(targets))
    h = torch.where(active[:, None], hidden.to(ct), zero)
    gb = torch.where(active[:, None], grad_bar.to(ct), zero)
    lb = torch.where(active, loss_bar.to(ct), zero)
    W = weight.to(ct)
    u_t = (gb * W[t]).sum(dim=1)  # grad_bar . W_t
    lse = _blockwise_lse(h, W, C) if lse is None else torch.where(active, lse.to(ct), zero)

    def block(start):
        W_blk = W[start:start + C]
        cols = torch.arange(start, start + W_blk.shape[0], device=hidden.device)
        is_t = cols[None, :] == t[:, None]
        return W_blk, is_t, torch.exp(h @ W_blk.t() - lse[:, None]), gb @ W_blk.t()

    s = c = torch.zeros(N, dtype=ct, device=hidden.device)
    for start in range(0, V, C):  # pass 1: the row sums over v != t of p and of p (u - u_t)
        _, is_t, p, u = block(start)
        p_nt = p.masked_fill(is_t, 0.0)
        s = s + p_nt.sum(dim=1)
        c = c + (p_nt * (u - u_t[:, None])).sum(dim=1)
    hidden_bar = torch.zeros_like(h) if need_hidden else None
    weight_bar = torch.empty_like(W) if need_weight else None
    for start in range(0, V, C):  # pass 2: delta = d J / d z, gamma = the direct weight term
        W_blk, is_t, p, u = block(start)
        delta = torch.where(is_t, (-lb * s)[:, None] - (w * c)[:, None] * p,
                            p * (lb[:, None] + w[:, None] * (u - u_t[:, None] - c[:, None])))
        if need_hidden:
            hidden_bar = hidden_bar + delta @ W_blk
        if need_weight:
            gamma = torch.where(is_t, (-w * s)[:, None], w[:, None] * p)
            weight_bar[start:start + C] = delta.t() @ h + gamma.t() @ gb
    return (hidden_bar.to(hidden.dtype) if need_hidden else None,
            weight_bar.to(weight.dtype) if need_weight else None)


def kernel_reason(hidden, weight, targets, row_weights, lse, loss_bar, grad_bar):
    """None when the Triton kernels can take this call, else why not."""
    reason = _first_order_reason(hidden, weight, targets, row_weights)
    if reason is not None:
        return reason
    for name, t in (("lse", lse), ("loss_bar", loss_bar)):
        if t.dtype != torch.float32:
            return f"{name} dtype {t.dtype} (the kernels take float32)"
    return None


def _check(hidden, weight, targets, row_weights, lse, loss_bar, grad_bar, backend):
    _check_head_loss(hidden, weight, targets, row_weights, None, None, backend)
    N, d = hidden.shape
    for name, t in (("lse", lse), ("loss_bar", loss_bar), ("grad_bar", grad_bar)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a tensor, got {type(t).__name__}")
        if t.device != hidden.device:
            raise ValueError(f"{name} is on {t.device}, hidden on {hidden.device}")
    loss_dtype = acc_dtype(hidden.dtype)
    for name, t in (("lse", lse), ("loss_bar", loss_bar)):
        if t.shape != (N,) or t.dtype != loss_dtype:
            raise ValueError(f"{name} must be ({N},) {loss_dtype}, got {tuple(t.shape)} {t.dtype}")
    if grad_bar.shape != (N, d) or grad_bar.dtype != hidden.dtype:
        raise ValueError(f"grad_bar must be ({N}, {d}) {hidden.dtype}, got {tuple(grad_bar.shape)} {grad_bar.dtype}")


def head_loss_double_backward(hidden, weight, targets, row_weights, lse, loss_bar, grad_bar, *, need_hidden=True,
                              need_weight=True, backend="auto", validate=True):
    """The backward of `head_loss_op`: with J = sum_r loss_bar_r loss_r + sum_r grad_bar_r . grad_r (loss and
    grad as `fused_head_loss` returns them), (dJ/d hidden (N, d) in hidden's dtype, dJ/d weight (V, d) in
    weight's dtype); either is None when need_hidden / need_weight is False.

    hidden, weight, targets, row_weights as in `fused_head_loss`; lse (N,) the rows' log-sum-exp of the
    logits (float32, float64 for float64 inputs; read only on rows with nonzero weight); loss_bar (N,) of
    lse's dtype; grad_bar (N, d) of hidden's dtype. Logits are recomputed a vocabulary block at a time,
    never held whole. backend and validate as in `fused_head_loss`."""
    if validate:
        _check(hidden, weight, targets, row_weights, lse, loss_bar, grad_bar, backend)
    reason = None if backend == "reference" else kernel_reason(hidden, weight, targets, row_weights, lse,
                                                               loss_bar, grad_bar)
    if reason is not None and hidden.device.type != "cuda":
        reason = on_host(reason)  # CPU tensors take the twin by design
    if use_kernel(backend, "head_loss_double_backward", reason, "Triton kernels"):
        from ..kernels.head_loss_double_backward import head_loss_double_backward as launch

        hidden_bar = torch.empty_like(hidden, memory_format=torch.contiguous_format) if need_hidden else None
        weight_bar = torch.empty_like(weight, memory_format=torch.contiguous_format) if need_weight else None
        launch(hidden, weight, targets, row_weights, lse, loss_bar, grad_bar, hidden_bar, weight_bar)
        return hidden_bar, weight_bar
    return head_loss_double_backward_reference(hidden, weight, targets, row_weights, lse, loss_bar, grad_bar,
                                               need_hidden=need_hidden, need_weight=need_weight)


def row_lse(hidden, weight, targets, row_weights, loss):
    """lse_r = loss_r + h_r . W_{t_r} on rows with nonzero weight, 0 elsewhere, in loss's dtype (N,)."""
    active = row_weights != 0
    t = torch.where(active, targets, torch.zeros_like(targets))
    z_t = torch.linalg.vecdot(hidden.to(loss.dtype), weight[t].to(loss.dtype))
    return torch.where(active, loss + z_t, torch.zeros_like(loss))


def _first_order(hidden, weight, targets, row_weights, backend):
    """(loss, grad) of fused_head_loss by its all-Triton "fused" method (logits only tile by tile) or the twin."""
    reason = None if backend == "reference" else _first_order_reason(hidden, weight, targets, row_weights)
    if reason is not None and hidden.device.type != "cuda":
        reason = on_host(reason)
    if use_kernel(backend, "head_loss_op", reason, "Triton kernels"):
        from ..kernels.head_loss import head_loss

        loss = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        grad = torch.empty_like(hidden, memory_format=torch.contiguous_format)
        head_loss(hidden, weight, targets, row_weights, loss, grad, method="fused")
        return loss, grad
    return fused_head_loss_reference(hidden, weight, targets, row_weights)


class _HeadLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, row_weights, backend):
        loss, grad = _first_order(hidden, weight, targets, row_weights, backend)
        ctx.save_for_backward(hidden, weight, targets, row_weights, row_lse(hidden, weight, targets, row_weights,
                                                                            loss))
        ctx.backend = backend
        return loss, grad

    @staticmethod
    def backward(ctx, loss_bar, grad_bar):
        hidden, weight, targets, row_weights, lse = ctx.saved_tensors
        need_hidden, need_weight = ctx.needs_input_grad[:2]
        if torch.is_grad_enabled():
            # create_graph: the backward must itself be differentiable, lse included
            hidden_bar, weight_bar = head_loss_double_backward_reference(
                hidden, weight, targets, row_weights, None, loss_bar, grad_bar.to(hidden.dtype),
                need_hidden=need_hidden, need_weight=need_weight)
        else:
            hidden_bar, weight_bar = head_loss_double_backward(
                hidden, weight, targets, row_weights, lse, loss_bar.to(lse.dtype), grad_bar.to(hidden.dtype),
                need_hidden=need_hidden, need_weight=need_weight, backend=ctx.backend, validate=False)
        return hidden_bar, weight_bar, None, None, None


def head_loss_op(hidden, weight, targets, row_weights, *, backend="auto", validate=True):
    """(loss_rows, grad_rows) with the values of `fused_head_loss` (same arguments, same dtypes), differentiable
    in hidden and weight through both outputs (the backward streams over vocabulary blocks, see the module
    docstring). row_weights and targets are treated as constants: row_weights must not require grad.
    backend: "auto" (the Triton kernels where they can run, else the twins), "kernel" (RuntimeError where they
    cannot), "reference" (the twins), for the forward and the backward alike."""
    if validate:
        _check_head_loss(hidden, weight, targets, row_weights, None, None, backend)
        if row_weights.requires_grad:
            raise ValueError("row_weights requires grad, but head_loss_op treats row_weights as a constant "
                             "(no gradient flows to it); pass row_weights.detach()")
    return _HeadLoss.apply(hidden, weight, targets, row_weights, backend)


__all__ = ["head_loss_double_backward", "head_loss_double_backward_reference", "head_loss_op", "kernel_reason",
           "row_lse"]
