"""gradmem_fast: write a context into a causal LM's memory vectors by test-time gradient descent.

    import gradmem_fast
    memory = gradmem_fast.write(model, m0, context_ids, mask, steps=5, lr=0.04)
    logits = gradmem_fast.read(model, memory, query_ids)
    tokens = gradmem_fast.generate(model, memory, query_ids, max_new_tokens=16)

`gradmem_fast.reference` holds the same API in plain PyTorch autograd (the definition of
correctness). Importing never touches a GPU and never compiles anything.
"""
from . import reference
from .api import explain, generate, memory_cache, read, write
from .dispatch import BackendChoice, BackendUnavailable
from .lm import GradMemLM

__version__ = "0.1.0"
__all__ = ["write", "read", "generate", "memory_cache", "explain", "reference", "BackendChoice", "BackendUnavailable",
           "GradMemLM", "__version__"]
