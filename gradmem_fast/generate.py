"""Generating from memory: `model.generate` continued from `[memory; query]`.

Hugging Face's generate decides which prompt tokens are already in a cache from the attention mask's
length: with a cache of m memory rows it needs a mask of m + Tq columns, else it takes the first m
query tokens as cached. It also appends new tokens after the last prompt column, so a right-padded
row would continue after its padding. `generate` therefore builds a fresh memory cache per call,
moves each query row's real tokens to the right end (the padding then sits between the memory and
the query, masked out; positions still follow from the mask, so the query continues at position m)
and passes the mask over [memory; query].
"""
import torch

from . import validation
from .reference.read import cache_keyword, memory_cache

# Arguments generate builds itself; passing them would silently replace the memory or its mask.
RESERVED = ("attention_mask", "cache", "past_key_values", "inputs_embeds", "position_ids", "input_ids")
# Arguments that make generate expand the batch (beams, several sequences per prompt).
EXPANDING = ("num_beams", "num_return_sequences")


def left_align(input_ids, mask):
    """Each row's real tokens moved to the right end: (ids, mask), both (B, T), left padded.

    mask is right padded (validated); the padding tokens keep their ids and move to the front.
    """
    B, T = input_ids.shape
    shift = T - mask.sum(dim=1, keepdim=True)  # (B, 1) pad count per row
    source = (torch.arange(T, device=input_ids.device).unsqueeze(0) - shift) % T
    return input_ids.gather(1, source), mask.gather(1, source)


def _check_generate_kwargs(model, kwargs, m, T):
    for name in RESERVED:
        if name in kwargs:
            raise ValueError(f"gradmem_fast.generate builds {name!r} itself from the memory and the query; "
                             f"do not pass {name}=")
    for name in EXPANDING:
        value = kwargs.get(name)
        if value is not None and value != 1:
            raise ValueError(f"{name}={value!r} is not supported by gradmem_fast.generate (the memory cache "
                             "is built for one sequence per query row); repeat the query rows instead")
    limit = validation.position_limit(model)
    new = kwargs.get("max_new_tokens")
    if limit is not None and isinstance(new, int) and m + T + new > limit:
        raise ValueError(f"memory rows + query tokens + max_new_tokens = {m} + {T} + {new} = {m + T + new} "
                         f"exceeds the model's position limit {limit}")


def generate(model, memory, input_ids, attention_mask=None, *, memory_proj=None, **generate_kwargs):
    """Continue each query from the memory: `model.generate` on [memory; query], memory as a KV cache.

    memory: (m, d), (1, m, d) (broadcast to the batch) or (B, m, d), pre-projection when memory_proj
    is given (as `write` returns it). input_ids: (B, Tq) query, any Tq >= 1; attention_mask: (B, Tq)
    of 1/0, right padded (None: all real). generate_kwargs go to `model.generate` (max_new_tokens,
    do_sample, eos_token_id, return_dict_in_generate, ...).

    Returns what `model.generate` returns: (B, Tq + new) sequences, the query as given followed by the
    new tokens (for a padded row the new tokens follow its padding, as with a right-padded prompt in
    Hugging Face). With return_dict_in_generate=True, the output's `sequences` has that layout.
    A new cache is built on every call, so calls never share state.
    """
    m = validation.memory_rows(memory)
    mask = validation.check_ids_and_mask(model, input_ids, attention_mask, m)
    B, T = input_ids.shape
    memory = validation.check_memory(model, memory, B)
    validation.check_memory_proj(model, memory_proj)
    _check_generate_kwargs(model, generate_kwargs, m, T)

    cache = memory_cache(model, memory.expand(B, -1, -1), memory_proj=memory_proj)
    aligned_ids, aligned_mask = left_align(input_ids, mask)
    full_mask = torch.cat([aligned_mask.new_ones(B, m), aligned_mask], dim=1)  # (B, m + Tq)
    generate_kwargs[cache_keyword(model)] = cache
    out = model.generate(input_ids=aligned_ids, attention_mask=full_mask, **generate_kwargs)
    sequences = out if isinstance(out, torch.Tensor) else out.sequences
    sequences[:, :T] = input_ids  # the query as the caller laid it out
    return out


__all__ = ["generate", "left_align"]
