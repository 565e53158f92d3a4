"""gradmem_fast: write a context into a causal LM's memory vectors by test-time gradient descent."""
__version__ = "0.1.0"
