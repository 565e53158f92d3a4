"""Answering from memory: teacher-forced logits after the memory, and the memory as a KV cache."""
import inspect

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
    """A transformers Cache holding the memory's keys and values at every layer, for driving the model yourself.

    `model(input_ids=q, **{cache_keyword(model): cache})` continues from the memory without
    recomputing it; positions continue after the m memory rows. The cache's batch is the memory's:
    pass a (B, m, d) memory (expand an (m, d) one) for a batch of B queries. Any attention mask passed
    with the query must cover the memory too: (B, m + Tq), ones over the memory columns.
    `model.generate` needs that mask even for unpadded queries: it reads the mask's length to tell
    cached from new tokens, and without it takes the first m query tokens as already cached (wrong
    tokens, or an error when Tq <= m); right-padded query rows would also continue after their padding.
    `gradmem_fast.generate` handles all of this. The cache grows as the model consumes tokens: build
    one per query (or copy.deepcopy it); never reuse one across generate calls. Computed without
    gradients.
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
    return output_cache(out)


def cache_keyword(model):
    """The keyword under which the installed transformers takes a KV cache: "cache" or "past_key_values"."""
    parameters = inspect.signature(model.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def output_cache(output):
    """The cache a forward returned, under either name (transformers renamed past_key_values to cache)."""
    if "cache" in output:
        return output["cache"]
    return output["past_key_values"]
