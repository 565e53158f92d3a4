"""The accumulation dtype of the PyTorch twins: float64 for float64 inputs, else float32."""
import torch


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; float32, float16 and bfloat16 accumulate in float32. Plain Python on purpose:
    torch.promote_types is an aten op, which a TorchDispatchMode (engine.launches) would see as a launch."""
    return torch.float64 if dtype == torch.float64 else torch.float32
