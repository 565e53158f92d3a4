"""Fused LM head + cross-entropy: per-row loss and the hidden-state gradient, without full logits.

    loss, grad_hidden = fused_head_loss(hidden, weight, targets, row_weights)

hidden (N, d) and weight (V, d) in fp32, fp16 or bf16 (the same dtype); targets (N,) int64;
row_weights (N,) float32. With z_i = h_i W^T (V,):

    loss_i = logsumexp(z_i) - z_i[t_i]                       (N,) float32, 0 where w_i == 0
    grad_i = w_i * (softmax(z_i) - onehot(t_i)) W            (N, d) in hidden's dtype

so grad_hidden is the gradient of sum_i w_i * loss_i with respect to hidden. The weight never gets a
gradient. Rows with w_i == 0 give loss 0 and gradient 0 whatever their hidden values and targets
(their targets need not be in [0, V)). See head_loss.md for the derivation and the kernels.
"""

import torch

from .._triton import interpreter_on, triton_reason
from ..backends import OP_BACKENDS, check_op_backend, on_host, use_kernel
from .dtypes import acc_dtype

BACKENDS = OP_BACKENDS
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# the twin also takes float64 (then it computes in float64)
DTYPES = KERNEL_DTYPES + (torch.float64,)
# rows per chunk of the twin's logits are chosen so that one chunk holds about this many elements
_REFERENCE_CHUNK_ELEMENTS = 1 << 24


def _outputs(hidden, loss_out, grad_out):
    N = hidden.shape[0]
    loss_dtype = acc_dtype(hidden.dtype)
    loss = loss_out if loss_out is not None else torch.empty(N, dtype=loss_dtype, device=hidden.device)
    grad = grad_out if grad_out is not None else torch.empty_like(hidden, memory_format=torch.contiguous_format)
    return loss, grad


def fused_head_loss_reference(hidden, weight, targets, row_weights, *, loss_out=None, grad_out=None):
    """Pure PyTorch twin of `fused_head_loss`: fp32 arithmetic (float64 for float64 inputs, whose loss
    is then float64 too), logits built a bounded chunk of rows at a time. Arguments and results as in
    `fused_head_loss`."""
    ct = acc_dtype(hidden.dtype)
    loss, grad = _outputs(hidden, loss_out, grad_out)
    N, V = hidden.shape[0], weight.shape[0]
    w_full = weight.to(ct)
    chunk = max(1, _REFERENCE_CHUNK_ELEMENTS // max(V, 1))
    for start in range(0, N, chunk):
        stop = min(N, start + chunk)
        rw = row_weights[start:stop].to(ct)
        active = rw != 0
        t = torch.where(active, targets[start:stop], torch.zeros_like(targets[start:stop]))
        logits = hidden[start:stop].to(ct) @ w_full.t()  # (rows, V)
        m = logits.max(dim=1, keepdim=True).values
        e = torch.exp(logits - m)
        e_t = e.gather(1, t[:, None])
        # the target column stays out of the sum: lse - z_t = log1p(s_nt / e_t) and p_t - 1 = -s_nt / s
        # need no difference of nearly equal numbers
        e_nt = e.scatter(1, t[:, None], 0.0)
        s_nt = e_nt.sum(dim=1, keepdim=True)
        tiny = torch.finfo(ct).tiny
        row_loss = torch.where(e_t > tiny, torch.log1p(s_nt / e_t.clamp_min(tiny)),
                               (m - logits.gather(1, t[:, None])) + torch.log(s_nt + e_t)).squeeze(1)
        loss[start:stop] = torch.where(active, row_loss, torch.zeros_like(row_loss))
        p = e_nt.scatter(1, t[:, None], -s_nt) / (s_nt + e_t)  # softmax - onehot(t)
        p = torch.where(active[:, None], p * rw[:, None], torch.zeros_like(p))
        grad[start:stop] = (p @ w_full).to(grad.dtype)
    return loss, grad


def kernel_reason(hidden, weight, targets, row_weights):
    """None when the Triton kernels can take this call, else why not."""
    reason = triton_reason(hidden, weight, targets, row_weights)
    if reason is not None:
        return reason
    if hidden.dtype not in KERNEL_DTYPES:
        return f"dtype {hidden.dtype} (the kernels take float32, float16, bfloat16)"
    if row_weights.dtype != torch.float32:
        return f"row_weights dtype {row_weights.dtype} (the kernels take float32)"
    if hidden.dtype == torch.bfloat16 and hidden.device.type == "cpu" and interpreter_on():
        return "bfloat16 under the Triton interpreter (its bfloat16 arithmetic is wrong)"
    return None


def _check(hidden, weight, targets, row_weights, loss_out, grad_out, backend):
    check_op_backend(backend)
    for name, t in (("hidden", hidden), ("weight", weight), ("targets", targets), ("row_weights", row_weights)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a tensor, got {type(t).__name__}")
    if hidden.dim() != 2:
        raise ValueError(f"hidden must be (N, d), got shape {tuple(hidden.shape)}")
    if hidden.dtype not in DTYPES:
        raise ValueError(f"hidden dtype {hidden.dtype} is not one of {DTYPES}")
    N, d = hidden.shape
    if weight.dim() != 2 or weight.shape[1] != d or weight.shape[0] < 1:
        raise ValueError(f"weight must be (V, d) with d = {d} and V >= 1, got shape {tuple(weight.shape)}")
    if weight.dtype != hidden.dtype:
        raise ValueError(f"weight dtype {weight.dtype} differs from hidden dtype {hidden.dtype}")
    if targets.shape != (N,) or targets.dtype != torch.int64:
        raise ValueError(f"targets must be (N,) = ({N},) int64, got shape {tuple(targets.shape)} {targets.dtype}")
    allowed_rw = (torch.float32, torch.float64) if hidden.dtype == torch.float64 else (torch.float32,)
    if row_weights.shape != (N,) or row_weights.dtype not in allowed_rw:
        raise ValueError(f"row_weights must be (N,) = ({N},) float32, got shape "
                         f"{tuple(row_weights.shape)} {row_weights.dtype}")
    for name, t in (("weight", weight), ("targets", targets), ("row_weights", row_weights)):
        if t.device != hidden.device:
            raise ValueError(f"{name} is on {t.device}, hidden on {hidden.device}")
    if loss_out is not None:
        loss_dtype = acc_dtype(hidden.dtype)
        if loss_out.shape != (N,) or loss_out.dtype != loss_dtype or loss_out.device != hidden.device \
                or not loss_out.is_contiguous():
            raise ValueError(f"loss_out must be a contiguous ({N},) {loss_dtype} tensor on {hidden.device}, got "
                             f"{tuple(loss_out.shape)} {loss_out.dtype} on {loss_out.device}")
    if grad_out is not None:
        if grad_out.shape != (N, d) or grad_out.dtype != hidden.dtype or grad_out.device != hidden.device \
                or not grad_out.is_contiguous():
            raise ValueError(f"grad_out must be a contiguous ({N}, {d}) {hidden.dtype} tensor on {hidden.device}, "
                             f"got {tuple(grad_out.shape)} {grad_out.dtype} on {grad_out.device}")
    capturing = hidden.is_cuda and torch.cuda.is_current_stream_capturing()
    if N > 0 and not capturing:  # the range check reads values back; skipped inside graph capture
        active = row_weights != 0
        bad = active & ((targets < 0) | (targets >= weight.shape[0]))
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise ValueError(f"targets[{i}] = {int(targets[i])} is outside [0, V = {weight.shape[0]}) "
                             f"on a row with nonzero weight")


def fused_head_loss(hidden, weight, targets, row_weights, *, loss_out=None, grad_out=None, backend="auto",
                    validate=True):
    """Per-row cross-entropy of the head `weight` on `hidden`, and its gradient with respect to hidden.

    hidden (N, d), weight (V, d) of one dtype (float32, float16, bfloat16); targets (N,) int64 in [0, V)
    on rows with nonzero weight; row_weights (N,) float32. Returns (loss (N,) float32, grad (N, d) in
    hidden's dtype): loss_i = logsumexp(h_i W^T) - (h_i W^T)[t_i] (0 where w_i == 0) and
    grad_i = w_i (softmax(h_i W^T) - onehot(t_i)) W, accumulated in fp32. Logits never exist in full:
    the extra memory is a fixed-size chunk independent of N * V (plus an fp32 (N, d) buffer on the
    all-Triton path). fp32 inputs use true fp32 products unless torch allows TF32 for float32 matmuls
    (`torch.backends.cuda.matmul.fp32_precision = "tf32"`, `allow_tf32` or `set_float32_matmul_precision`).

    loss_out / grad_out: preallocated outputs to write into (reused across calls, e.g. in a CUDA graph).
    backend: "auto" (the Triton kernels when they can run, else the PyTorch twin), "kernel" (raise
    RuntimeError with the reason when they cannot), "reference" (the twin). validate=False skips the
    argument checks (for hot-path callers that already know the arguments are valid); the only check
    that reads values back to the host (targets in range) is also skipped during CUDA graph capture.
    No host synchronisation happens otherwise: the call can be captured in a CUDA graph.
    """
    if validate:
        _check(hidden, weight, targets, row_weights, loss_out, grad_out, backend)
    reason = None if backend == "reference" else kernel_reason(hidden, weight, targets, row_weights)
    if reason is not None and hidden.device.type != "cuda":
        reason = on_host(reason)  # CPU tensors take the twin by design
    if use_kernel(backend, "fused_head_loss", reason, "Triton kernels"):
        from ..kernels.head_loss import head_loss

        loss, grad = _outputs(hidden, loss_out, grad_out)
        head_loss(hidden, weight, targets, row_weights, loss, grad)
        return loss, grad
    return fused_head_loss_reference(hidden, weight, targets, row_weights, loss_out=loss_out, grad_out=grad_out)


__all__ = ["fused_head_loss", "fused_head_loss_reference", "kernel_reason"]
