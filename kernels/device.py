"""Triton launches on the current CUDA device: make the tensors' device current for a launch."""
import contextlib

import torch


def on_device(t):
    """Context manager: t's CUDA device made current (a no-op for CPU tensors under the interpreter)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()
