"""The GradMem write in plain PyTorch autograd: the definition every fast backend reproduces."""
import torch

from .. import validation
from .attention import reference_attention_mode
from .model_io import per_sample_loss, project_memory


def clip_gradient(grad, clip_value=None, clip_norm=None):
    """Element-wise clamp to [-clip_value, clip_value], then per-sample L2-norm clip of (B, m, d)."""
    if clip_value is not None:
        grad = grad.clamp(-clip_value, clip_value)
    if clip_norm is not None:
        norm = grad.flatten(1).to(torch.promote_types(grad.dtype, torch.float32)).norm(dim=1)
        scale = (clip_norm / (norm + 1e-6)).clamp(max=1.0)
        grad = grad * scale.to(grad.dtype).view(-1, 1, 1)
    return grad


def write(model, memory, input_ids, attention_mask=None, *, steps, lr, write_head=None, memory_proj=None,
          clip_value=None, clip_norm=None, grad_mode="none", second_order_steps=None, return_losses=False):
    """K = `steps` gradient steps on the memory; see gradmem_fast.write for the full contract."""
    memory, mask, head = validation.check_write(
        model, memory, input_ids, attention_mask, steps=steps, lr=lr, write_head=write_head,
        memory_proj=memory_proj, clip_value=clip_value, clip_norm=clip_norm, grad_mode=grad_mode,
        second_order_steps=second_order_steps)
    return write_unchecked(model, memory, input_ids, mask, steps=steps, lr=float(lr), write_head=head,
                           memory_proj=memory_proj, clip_value=clip_value, clip_norm=clip_norm,
                           grad_mode=grad_mode, second_order_steps=second_order_steps,
                           return_losses=return_losses)


def meta_inputs_require_grad(model, memory, write_head, memory_proj):
    """Whether anything a write's result or losses can be differentiated against requires grad: the
    initial memory, a model parameter, the write head or the projection's weight or bias."""
    tensors = [memory, write_head, *model.parameters()]
    if memory_proj is not None:
        tensors += list(memory_proj.parameters())
    return any(t is not None and t.requires_grad for t in tensors)


def first_order_step_count(steps, grad_mode, second_order_steps):
    """How many leading steps are first order: all of them unless grad_mode is 'second'; with 'second',
    steps - second_order_steps (None: 0)."""
    if grad_mode != "second":
        return steps
    return 0 if second_order_steps is None else steps - second_order_steps


def write_unchecked(model, memory, input_ids, attention_mask, *, steps, lr, write_head, memory_proj,
                    clip_value, clip_norm, grad_mode, return_losses, second_order_steps=None):
    """The write on validated arguments: memory (1 or B, m, d), mask (B, T), write_head a tensor or None.

    Gradient modes, with g_k = clip(grad_M sum_b L_b(M_k)):
      none    the result and the losses are detached.
      first   M_K = M_0 - lr * sum_k stopgrad(g_k): d M_K / d M_0 = I, nothing reaches the weights.
      second  steps k >= K - j (j = second_order_steps, None: j = K) are M_{k+1} = M_k - lr * g_k with g_k
              differentiable (create_graph); the earlier ones are M_{k+1} = M_k - lr * stopgrad(g_k).
    Losses (return_losses, (B, K) float32) under "first" and "second" are what an autograd loop returns:
    loss k is L(M_k) differentiable w.r.t. the weights (model, write head, projection) directly and
    w.r.t. M_0 through M_k's own graph (identity under "first", the chain of updates under "second",
    where a first-order step passes the identity). They carry a graph only when something among M_0,
    the model's parameters, the write head and the projection requires grad, and then every step's graph
    is kept until they are freed, as in an autograd loop.
    """
    B = input_ids.shape[0]
    start = memory.expand(B, -1, -1)
    first_order_steps = first_order_step_count(steps, grad_mode, second_order_steps)
    keep_loss_graph = (return_losses and grad_mode != "none"
                       and meta_inputs_require_grad(model, memory, write_head, memory_proj))
    losses = []

    def step_loss(current):
        return per_sample_loss(model, project_memory(current, memory_proj), input_ids, attention_mask, write_head)

    def record(loss):
        losses.append(loss.float() if keep_loss_graph else loss.detach().float())

    def first_order_gradient(current, tracked):
        """stopgrad(g) at the value of `current`; the loss is formed at `tracked`, which has current's value
        and the graph the loss must keep (None: no graph)."""
        leaf = current.detach().requires_grad_(True)
        at = leaf if tracked is None or not tracked.requires_grad else leaf + (tracked - tracked.detach())
        loss = step_loss(at)
        grad, = torch.autograd.grad(loss.sum(), leaf, retain_graph=keep_loss_graph)
        record(loss)
        return clip_gradient(grad, clip_value, clip_norm)

    with torch.enable_grad():
        if grad_mode == "second":
            current = start if start.requires_grad else start.detach().requires_grad_(True)
            with reference_attention_mode(model):
                for k in range(steps):
                    if k < first_order_steps:
                        current = current - lr * first_order_gradient(current, current if keep_loss_graph else None)
                        continue
                    loss = step_loss(current)
                    grad, = torch.autograd.grad(loss.sum(), current, create_graph=True)
                    record(loss)
                    current = current - lr * clip_gradient(grad, clip_value, clip_norm)
            result = current
        else:
            tracked = start if keep_loss_graph else None
            current = start.detach()
            for _ in range(steps):
                current = (current - lr * first_order_gradient(current, tracked)).detach()
            # first order: M_K = M_0 - lr * sum_k stopgrad(g_k), so d M_K / d M_0 = I
            result = current if grad_mode == "none" else start + (current - start).detach()
    if grad_mode == "none":
        result = result.detach()
    if not return_losses:
        return result
    if losses:
        loss_table = torch.stack(losses, dim=1)
    else:
        loss_table = torch.zeros(B, 0, dtype=torch.float32, device=input_ids.device)
    return result, loss_table
