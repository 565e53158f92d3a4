"""Answering from memory: teacher-forced logits after the memory, and the memory as a KV cache."""
import torch

from .. import validation
from .model_io import embed_with_memory, project_memory


def read(model, memory, input_ids, attention_mask=None, *, memory_proj=None):
    """Logits (B, Tq, V) where logits[:, i] predicts input_ids[:, i] from the memory and earlier tokens.

    The last memory position predicts the first query token. `memory` is (m, d), (1, m, d) or
    (B, m, d) (pre-projection when `memory_proj` is given, as `write` returns it).
    """
    mask = validation.check_ids_and_mask(model, input_ids, attention_mask, validation.memory_rows(memory))
    memory = validation.check_memory(model, memory, input_ids.shape[0])
    validation.check_memory_proj(model, memory_proj)
    m, T = memory.shape[1], input_ids.shape[1]
    inputs_embeds, full_mask, positions = embed_with_memory(
        model, project_memory(memory, memory_proj), input_ids, mask)
    logits = model(inputs_embeds=inputs_embeds, attention_mask=full_mask, position_ids=positions,
                   use_cache=False).logits
    return logits[:, m - 1 : m - 1 + T]


def memory_cache(model, memory, *, memory_proj=None):
    """A transformers Cache holding the memory's keys and values at every layer.

    `model(input_ids=q, past_key_values=cache)` and `model.generate(input_ids=q, past_key_values=cache)`
    then continue from the memory without recomputing it; positions continue after the m memory rows.
    When passing an attention_mask with the query, it must cover the memory too: (B, m + Tq).
    The cache grows as the model consumes tokens: build one per query (or copy.deepcopy it).
    Computed without gradients.
    """
    if isinstance(memory, torch.Tensor) and memory.dim() == 2:
        memory = memory.unsqueeze(0)
    batch = memory.shape[0] if isinstance(memory, torch.Tensor) and memory.dim() == 3 else 1
    memory = validation.check_memory(model, memory, batch)
    validation.check_memory_proj(model, memory_proj)
    m = memory.shape[1]
    limit = validation.position_limit(model)
    if limit is not None and m > limit:
        raise ValueError(f"memory rows {m} exceed the model's position limit {limit}")
    with torch.no_grad():
        memory_in = project_memory(memory, memory_proj)
        dtype = model.get_input_embeddings().weight.dtype
        positions = torch.arange(m, device=memory.device).unsqueeze(0).expand(memory.shape[0], -1)
        out = model(inputs_embeds=memory_in.to(dtype), position_ids=positions, use_cache=True)
    return out.past_key_values
