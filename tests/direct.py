"""An independent GradMem write for tests: one sample at a time, unpadded, full HF logits,
explicit log-softmax. Slow and simple on purpose."""
import torch


def direct_sample_loss(model, memory_b, ids_b, write_head=None, memory_proj=None):
    """Mean next-token loss of one unpadded sample given its memory (m, d)."""
    m = memory_b.shape[0]
    mem_in = memory_proj(memory_b) if memory_proj is not None else memory_b
    embeds = model.get_input_embeddings()(ids_b)
    x = torch.cat([mem_in.to(embeds.dtype), embeds], dim=0).unsqueeze(0)
    positions = torch.arange(x.shape[1]).unsqueeze(0)
    if write_head is None:
        logits = model(inputs_embeds=x, position_ids=positions).logits[0]
    else:
        hidden = model.base_model(inputs_embeds=x, position_ids=positions).last_hidden_state[0]
        logits = hidden @ write_head.t()
    logp = torch.log_softmax(logits[m - 1 : m - 1 + ids_b.shape[0]].double(), dim=-1)
    return -logp[torch.arange(ids_b.shape[0]), ids_b].mean()


def direct_write(model, memory, ids, mask, steps, lr, write_head=None, memory_proj=None, clip_value=None,
                 clip_norm=None, create_graph=False):
    """Returns (memories (B, m, d), losses (B, K) float64). memory is (m, d) or (B, m, d)."""
    B = ids.shape[0]
    outs, losses = [], []
    for b in range(B):
        L = int(mask[b].sum())
        ids_b = ids[b, :L]
        current = memory if memory.dim() == 2 else memory[b]
        if not create_graph:
            current = current.detach()
        sample_losses = []
        for _ in range(steps):
            if not current.requires_grad:
                current = current.detach().requires_grad_(True)
            loss = direct_sample_loss(model, current, ids_b, write_head, memory_proj)
            grad, = torch.autograd.grad(loss, current, create_graph=create_graph)
            sample_losses.append(loss.detach())
            if clip_value is not None:
                grad = torch.clamp(grad, -clip_value, clip_value)
            if clip_norm is not None:
                norm = torch.sqrt((grad.double() ** 2).sum())
                grad = grad * torch.clamp(clip_norm / (norm + 1e-6), max=1.0).to(grad.dtype)
            current = current - lr * grad
            if not create_graph:
                current = current.detach()
        outs.append(current)
        losses.append(torch.stack(sample_losses) if sample_losses else torch.zeros(0, dtype=torch.float64))
    return torch.stack(outs), torch.stack(losses)
