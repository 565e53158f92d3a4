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
          clip_value=None, clip_norm=None, grad_mode="none", return_losses=False):
    """K = `steps` gradient steps on the memory; see gradmem_fast.write for the full contract."""
    memory, mask, head = validation.check_write(
        model, memory, input_ids, attention_mask, steps=steps, lr=lr, write_head=write_head,
        memory_proj=memory_proj, clip_value=clip_value, clip_norm=clip_norm, grad_mode=grad_mode)
    return write_unchecked(model, memory, input_ids, mask, steps=steps, lr=float(lr), write_head=head,
                           memory_proj=memory_proj, clip_value=clip_value, clip_norm=clip_norm,
                           grad_mode=grad_mode, return_losses=return_losses)


def write_unchecked(model, memory, input_ids, attention_mask, *, steps, lr, write_head, memory_proj,
                    clip_value, clip_norm, grad_mode, return_losses):
    """The write on validated arguments: memory (1 or B, m, d), mask (B, T), write_head a tensor or None."""
    B = input_ids.shape[0]
    start = memory.expand(B, -1, -1)
    losses = []

    def step_loss(current, create_graph):
        memory_in = project_memory(current, memory_proj)
        loss = per_sample_loss(model, memory_in, input_ids, attention_mask, write_head)
        grad, = torch.autograd.grad(loss.sum(), current, create_graph=create_graph)
        losses.append(loss.detach().float())
        return clip_gradient(grad, clip_value, clip_norm)

    with torch.enable_grad():
        if grad_mode == "second":
            current = start if start.requires_grad else start.detach().requires_grad_(True)
            with reference_attention_mode(model):
                for _ in range(steps):
                    current = current - lr * step_loss(current, create_graph=True)
            result = current
        else:
            current = start.detach()
            for _ in range(steps):
                leaf = current.requires_grad_(True)
                current = (leaf - lr * step_loss(leaf, create_graph=False)).detach()
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
