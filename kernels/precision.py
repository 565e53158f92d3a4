"""tl.dot input precision from torch's float32 matmul setting."""
import torch


def tf32_allowed():
    """Whether torch lets float32 matmuls use TF32. Reads `fp32_precision` (torch >= 2.9), which also
    reflects the legacy `allow_tf32` and `set_float32_matmul_precision`; reading `allow_tf32` itself
    raises once the new API has been used."""
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):
        return matmul.fp32_precision == "tf32"
    return bool(matmul.allow_tf32)


def dot_precision(dtype):
    """tl.dot `input_precision`: fp32 inputs are multiplied in true fp32 ("ieee") unless TF32 is allowed;
    16-bit inputs keep Triton's default (their products are exact in the fp32 accumulator)."""
    if dtype != torch.float32:
        return "tf32"
    return "tf32" if tf32_allowed() else "ieee"
