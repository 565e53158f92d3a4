"""Running a Hugging Face causal LM on `[memory; tokens]` the way the plain PyTorch loop does."""
import torch
import torch.nn.functional as F


def project_memory(memory, memory_proj):
    """The memory as it enters the model: memory_proj(M) when a projection is given."""
    if memory_proj is None:
        return memory
    return memory_proj(memory.to(memory_proj.weight.dtype))


def embed_with_memory(model, memory_in, input_ids, attention_mask):
    """inputs_embeds (B, m + T, d), the extended mask (B, m + T) and positions 0..m+T-1."""
    B, T = input_ids.shape
    m = memory_in.shape[1]
    embeds = model.get_input_embeddings()(input_ids)
    memory_in = memory_in.to(embeds.dtype).expand(B, -1, -1)
    inputs_embeds = torch.cat([memory_in, embeds], dim=1)
    mask = torch.cat([attention_mask.new_ones(B, m), attention_mask], dim=1)
    positions = torch.arange(m + T, device=input_ids.device).unsqueeze(0).expand(B, -1)
    return inputs_embeds, mask, positions


def context_hidden(model, memory_in, input_ids, attention_mask):
    """Final-norm hidden states of the rows that predict the context tokens: (B, T, d).

    Row i (0-based) is position m - 1 + i, which predicts token i.
    """
    m = memory_in.shape[1]
    T = input_ids.shape[1]
    inputs_embeds, mask, positions = embed_with_memory(model, memory_in, input_ids, attention_mask)
    hidden = model.base_model(inputs_embeds=inputs_embeds, attention_mask=mask, position_ids=positions,
                              use_cache=False).last_hidden_state
    return hidden[:, m - 1 : m - 1 + T]


def per_sample_loss(model, memory_in, input_ids, attention_mask, write_head=None):
    """Sample b's mean next-token loss over its real context tokens: (B,), at least float32."""
    hidden = context_hidden(model, memory_in, input_ids, attention_mask)
    if write_head is None:
        logits = model.get_output_embeddings()(hidden)
    else:
        logits = F.linear(hidden, write_head)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    B, T, V = logits.shape
    ce = F.cross_entropy(logits.reshape(B * T, V), input_ids.reshape(B * T), reduction="none").view(B, T)
    real = attention_mask.bool()
    ce = torch.where(real, ce, torch.zeros_like(ce))
    return ce.sum(dim=1) / real.sum(dim=1).to(ce.dtype)
