"""The fast writer: K GradMem steps without autograd, hand-written per-layer backward, layer-0 reuse,
on-device memory update, and on CUDA one captured graph per shape, replayed (engine.md)."""
from .write import fast_reason, fast_write

__all__ = ["fast_reason", "fast_write"]
