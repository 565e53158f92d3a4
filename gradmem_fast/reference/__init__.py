"""The GradMem write and read in plain PyTorch autograd: the definition of correctness."""
from .read import memory_cache, read
from .write import clip_gradient, write

__all__ = ["write", "read", "memory_cache", "clip_gradient"]
