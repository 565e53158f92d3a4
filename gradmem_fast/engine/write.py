"""The fast writer's entry points: fast_reason (can it take this call?) and fast_write."""
import os

import torch

from ..backends import resolve_op_backend
from ..kernels.device import on_device
from .ops import ops_for
from .plan import build_plan
from .second_order import meta_write, needs_meta_write, recompute_reason
from .specs import check_length, length_reason, spec_of
from .step import write_step

ENV_GRAPHS = "GRADMEM_FAST_CUDA_GRAPHS"
MODEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def fast_reason(model, memory, *, write_head, memory_proj, grad_mode, seq_len=None, return_losses=False):
    """None when fast_write can take this call, else why not (one string). seq_len: m + T when known."""
    try:
        from ..models import UnsupportedModel
    except ImportError as exc:
        return f"the model adapters could not be imported ({exc})"
    try:
        spec, _ = spec_of(model)
    except UnsupportedModel as exc:
        return str(exc)
    if spec.embedding.dtype not in MODEL_DTYPES:
        return f"model dtype {spec.embedding.dtype} is not one of float32, float16, bfloat16"
    if isinstance(memory, torch.Tensor) and memory.dtype not in MODEL_DTYPES + (torch.float64,):
        return f"memory dtype {memory.dtype} is not supported"
    too_long = None if seq_len is None else length_reason(spec, seq_len)
    if too_long is not None:
        return too_long
    if isinstance(memory, torch.Tensor) and needs_meta_write(model, memory, grad_mode, return_losses, write_head,
                                                             memory_proj):
        return recompute_reason(spec)
    return None


def _op_backend(op_backend):
    return resolve_op_backend(op_backend or None)


def _use_graphs(device, use_graphs):
    if device.type != "cuda":
        return False
    if use_graphs is None:
        return os.environ.get(ENV_GRAPHS, "1") != "0"
    return bool(use_graphs)


def fast_write(model, memory, input_ids, attention_mask, *, steps, lr, write_head, memory_proj, clip_value,
               clip_norm, grad_mode, return_losses, op_backend=None, use_graphs=None, second_order_steps=None):
    """K = steps GradMem steps without autograd (arguments already validated by gradmem_fast.write).

    memory (1 or B, m, d); input_ids (B, T); attention_mask (B, T) right padded; write_head (V, d) or
    None; memory_proj nn.Linear(d, d) or None. op_backend ("auto" | "kernel" | "reference", default from
    GRADMEM_FAST_OP_BACKEND) picks the ops' backend; use_graphs (default: on for CUDA unless
    GRADMEM_FAST_CUDA_GRAPHS=0) replays a captured step. Returns M_K (B, m, d) in memory's dtype, and the
    (B, K) float32 per-step losses with return_losses.
    """
    if grad_mode not in ("none", "first", "second"):
        raise ValueError(f"unknown grad_mode {grad_mode!r}")
    ops = ops_for(_op_backend(op_backend))
    if needs_meta_write(model, memory, grad_mode, return_losses, write_head, memory_proj):
        return meta_write(model, memory, input_ids, attention_mask, steps=steps, lr=lr, write_head=write_head,
                          memory_proj=memory_proj, clip_value=clip_value, clip_norm=clip_norm, grad_mode=grad_mode,
                          return_losses=return_losses, ops=ops, second_order_steps=second_order_steps,
                          use_graphs=_use_graphs(input_ids.device, use_graphs))
    B, T = input_ids.shape
    m = memory.shape[-2]
    start_view = memory.expand(B, m, memory.shape[-1])
    start = start_view.detach().clone(memory_format=torch.contiguous_format)
    losses = None
    if return_losses:
        losses = torch.empty(B, steps, dtype=torch.float32, device=input_ids.device)
    if steps > 0:
        # only rows that predict a real token reach the head: their count is the one host read of a
        # write, before any step (the argument checks already read the mask); the steps read nothing back
        real_rows = B * T if attention_mask is None else int(attention_mask.sum())
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        spec, signature = spec_of(model)
        check_length(spec, m, T)
        with torch.no_grad():
            if _use_graphs(input_ids.device, use_graphs):
                from .graphs import graph_write  # makes the tensors' device current itself
                result = graph_write(model, spec, signature, ops, start, input_ids, attention_mask, steps=steps,
                                     lr=lr, write_head=write_head, memory_proj=memory_proj, clip_value=clip_value,
                                     clip_norm=clip_norm, losses=losses, real_rows=real_rows)
            else:
                with on_device(start):  # Triton launches on the current device
                    result = _eager_write(spec, ops, start, input_ids, attention_mask, steps, lr, write_head,
                                          memory_proj, clip_value, clip_norm, losses, real_rows)
    else:
        result = start
    if grad_mode == "first":
        result = start_view + (result - start_view).detach()
    if return_losses:
        return result, losses
    return result


def _eager_write(spec, ops, memory, input_ids, attention_mask, steps, lr, write_head, memory_proj, clip_value,
                 clip_norm, losses, real_rows):
    """memory (B, m, d) contiguous, updated in place and returned; real_rows: the mask's sum."""
    plan = build_plan(spec, ops, input_ids, attention_mask, memory.shape[1], memory.dtype, write_head,
                      memory_proj, head_rows_count=real_rows)
    lr_t = torch.full((), lr, dtype=torch.float32, device=memory.device)
    step_loss = torch.empty(memory.shape[0], dtype=torch.float32, device=memory.device)
    for k in range(steps):
        write_step(plan, memory, lr_t, step_loss, clip_value, clip_norm)
        if losses is not None:
            losses[:, k].copy_(step_loss)
    return memory
