"""The plain write loop the fast writer is measured against, and its torch.compile variant.

Plain loop: a Hugging Face model (SDPA attention) with frozen weights, the context embedded once,
full logits, cross-entropy in fp32 (or wider), per-sample mean over real tokens then summed over the batch, and
`torch.autograd.grad(loss, memory)` per step.
"""
import torch
import torch.nn.functional as F


def write_loss(model, memory, embeds, targets, weights):
    """Summed per-sample mean next-token loss of `[memory ; embeds]`.

    memory (B, m, d), embeds (B, T, d), targets (B, T) int64, weights (B, T) = mask / L_b in the
    loss dtype (fp32, or fp64 for an fp64 model).
    Token i of the context is predicted from position m - 1 + i.
    """
    m = memory.shape[1]
    T = embeds.shape[1]
    logits = model(inputs_embeds=torch.cat([memory, embeds], dim=1)).logits  # (B, m + T, V)
    logits = logits[:, m - 1 : m - 1 + T]
    logits = logits.to(loss_dtype(logits.dtype))
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
    return (ce * weights.reshape(-1)).sum()


def loss_dtype(dtype):
    return torch.promote_types(dtype, torch.float32)


def loss_weights(input_ids, attention_mask=None, dtype=torch.float32):
    """(B, T) weights 1 / L_b on real tokens, 0 on padding."""
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    mask = attention_mask.to(dtype)
    return mask / mask.sum(dim=1, keepdim=True).clamp_min(1.0)


def plain_write(model, memory, input_ids, attention_mask=None, *, steps, lr, forward=None):
    """M_K after `steps` SGD steps from `memory` (m, d) or (B, m, d); returns (B, m, d), detached.

    `forward` replaces `model` for the forward pass (a compiled module); the embedding table and
    the loss stay outside it. Padding must be on the right: it is excluded from the loss, and
    causal attention keeps real rows independent of it, so the model runs without a mask.
    """
    B = input_ids.shape[0]
    embeds = model.get_input_embeddings()(input_ids).detach()
    weights = loss_weights(input_ids, attention_mask, loss_dtype(embeds.dtype))
    mem = memory.detach()
    if mem.dim() == 2:
        mem = mem.unsqueeze(0).expand(B, -1, -1)
    run = model if forward is None else forward
    for _ in range(steps):
        mem = mem.detach().requires_grad_(True)
        if forward is not None:
            torch.compiler.cudagraph_mark_step_begin()
        loss = write_loss(run, mem, embeds, input_ids, weights)
        (grad,) = torch.autograd.grad(loss, mem)
        mem = mem.detach() - lr * grad
    return mem.detach()


def compile_model(model):
    """The model under torch.compile(mode="reduce-overhead") (CUDA graphs via cudagraph trees)."""
    return torch.compile(model, mode="reduce-overhead")
