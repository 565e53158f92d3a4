"""One write step: forward, loss, hand-written backward to the memory, in-place memory update."""
import torch
import torch.nn.functional as F

from .layers import layer0_backward, layer0_forward, layer_backward, layer_forward


def memory_in(plan, memory):
    """memory (B, m, d) in its own dtype -> (x_mem, in_rows): the memory rows entering the model (B, m, d),
    model dtype; in_rows when x_mem already is the memory rows of the layer-0 input buffer. With B == 1 and
    no learned positions x_mem may keep the memory's (or projection's) dtype: layer0_forward's copy into the
    layer-0 input rows casts it, one launch instead of a cast and a copy."""
    x = memory
    if plan.proj_weight is not None:
        x = F.linear(x.to(plan.proj_weight.dtype), plan.proj_weight, plan.proj_bias)
    if plan.B == 1 and plan.pos_mem is None:
        return x, False
    x = x.to(plan.dtype)
    if plan.pos_mem is not None:
        if plan.B == 1:  # those rows are contiguous: the add writes them, no copy (B > 1 would need two)
            return torch.add(x, plan.pos_mem, out=plan.layer0.rows[:, :plan.m]), True
        x = x + plan.pos_mem
    return x, False


def memory_in_backward(plan, d_x):
    """Gradient w.r.t. the model-dtype memory rows -> gradient w.r.t. the memory, memory dtype."""
    if plan.proj_weight is not None:
        d_x = torch.matmul(d_x.to(plan.proj_weight.dtype), plan.proj_weight)
    return d_x.to(plan.memory_dtype)


def forward_backward(plan, memory, step_loss):
    """Gradient of sum_b L_b w.r.t. memory (B, m, d); writes each sample's loss into step_loss (B,)."""
    spec, ops, m = plan.spec, plan.ops, plan.m
    pending, h, saved0 = layer0_forward(plan, *memory_in(plan, memory))
    saved = []
    for i in range(1, len(spec.layers)):
        pending, h, s = layer_forward(plan, i, pending, h)
        saved.append(s)
    y, h_final, s_final = ops.add_norm_forward(pending, h, spec.final_norm, spec.norm_kind)
    head = plan.head
    if head.index is None:  # B == 1: rows m-1 .. m-2+R, contiguous
        hidden = y.view(-1, y.shape[-1])[m - 1:m - 1 + head.R]
    else:
        hidden = torch.index_select(y.view(-1, y.shape[-1]), 0, head.index, out=head.hidden)
    ops.head_loss(hidden, head.weight, head.targets, head.weights, head.loss_rows, head.grad_rows)
    if head.index is not None:
        # every other row of d_final stays zero for the whole write: no per-step clearing
        head.d_final.index_copy_(0, head.index, head.grad_rows)
    torch.mv(head.loss_matrix, head.loss_rows, out=step_loss)  # sum_i w_i loss_i per sample, one launch
    g = ops.add_norm_backward(head.d_final.view(y.shape), None, h_final, spec.final_norm, s_final,
                              spec.norm_kind)
    for i in reversed(range(1, len(spec.layers))):
        g = layer_backward(plan, i, g, saved[i - 1])
    return memory_in_backward(plan, layer0_backward(plan, g, saved0))


def write_step(plan, memory, lr, step_loss, clip_value=None, clip_norm=None):
    """M <- M - lr * clip(grad) in place. memory (B, m, d), lr fp32 device tensor, step_loss (B,) fp32."""
    grad = forward_backward(plan, memory, step_loss)
    plan.ops.memory_update_(memory, grad, lr, clip_value, clip_norm)
