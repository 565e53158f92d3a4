"""Rotary position embedding: cos/sin tables and an in-place rotation of (B, S, H, D) tensors, or of
(B, S, H, G, D) ones (G sub-heads per head, e.g. q and k of each head in a per-head fused projection).

The rotation is orthogonal, so its input gradient is the inverse rotation (`inverse=True`, the sin
sign flipped): the backward of `apply_rotary_` is `apply_rotary_` on the gradient. See fused_ops.md.
"""
import torch

from .. import _ext
from .dtypes import acc_dtype

# ---------------------------------------------------------------- pure-PyTorch twins


def rotary_tables_reference(inv_freq, positions, attention_scaling):
    """cos, sin (S, rotary_dim // 2) float32: cos/sin(positions[s] * inv_freq[i]) * attention_scaling,
    the product taken in float32 as Hugging Face models do."""
    freqs = positions.to(torch.float32)[:, None] * inv_freq.to(torch.float32)[None, :]
    return freqs.cos() * attention_scaling, freqs.sin() * attention_scaling


def _pairs(x, rotary_dim, interleaved):
    if interleaved:
        return x[..., 0:rotary_dim:2], x[..., 1:rotary_dim:2]
    half = rotary_dim // 2
    return x[..., :half], x[..., half:rotary_dim]


def apply_rotary__reference(x, cos, sin, *, rotary_dim, interleaved=False, inverse=False):
    """In place: each pair (a, b) of the first rotary_dim features of x (B, S, H, D) or (B, S, H, G, D)
    becomes (a cos - b sin, b cos + a sin) with row s of the tables for x[:, s]; inverse flips sin's sign."""
    acc = acc_dtype(x.dtype)
    a, b = _pairs(x, rotary_dim, interleaved)
    table_shape = (1, cos.shape[0]) + (1,) * (x.dim() - 3) + (cos.shape[1],)
    c = cos.to(acc).view(table_shape)
    s = sin.to(acc).view(table_shape)
    if inverse:
        s = -s
    af, bf = a.to(acc), b.to(acc)
    new_a = af * c - bf * s
    new_b = bf * c + af * s
    a.copy_(new_a)
    b.copy_(new_b)
    return x


# ---------------------------------------------------------------- public functions


def rotary_tables(inv_freq, positions, attention_scaling, *, out=None, backend="auto", validate=True):
    """cos, sin (S, rotary_dim // 2) float32 for positions (S,) and inv_freq (rotary_dim // 2,).
    `out=(cos, sin)` reuses preallocated buffers."""
    if validate:
        if inv_freq.dim() != 1 or not inv_freq.is_floating_point():
            raise ValueError(f"inv_freq must be a 1-d float tensor, got {inv_freq.dtype} {tuple(inv_freq.shape)}")
        if positions.dim() != 1:
            raise ValueError(f"positions must be 1-d (S,), got shape {tuple(positions.shape)}")
        if positions.device != inv_freq.device:
            raise ValueError(f"positions on {positions.device}, inv_freq on {inv_freq.device}")
        if positions.is_complex() or positions.dtype == torch.bool:
            raise ValueError(f"positions must be integer or float, got {positions.dtype}")
        if out is not None:
            shape = (positions.shape[0], inv_freq.shape[0])
            for name, t in zip(("out[0] (cos)", "out[1] (sin)"), out):
                if t.shape != shape or t.dtype != torch.float32 or t.device != inv_freq.device \
                        or not t.is_contiguous():
                    raise ValueError(f"{name} must be contiguous float32 {shape} on {inv_freq.device}, "
                                     f"got {t.dtype} {tuple(t.shape)} on {t.device}")
    why = None
    if inv_freq.dtype != torch.float32:
        why = f"inv_freq dtype {inv_freq.dtype} (the kernel takes float32)"
    elif positions.dtype not in (torch.int64, torch.int32, torch.float32):
        why = f"positions dtype {positions.dtype} (the kernel takes int64, int32, float32)"
    if _ext.use_kernel(backend, "rotary_tables", inv_freq, positions, why=why):
        S, half = positions.shape[0], inv_freq.shape[0]
        if out is None:
            out = (torch.empty(S, half, dtype=torch.float32, device=inv_freq.device),
                   torch.empty(S, half, dtype=torch.float32, device=inv_freq.device))
        _ext.load().rotary_tables(inv_freq.contiguous(), positions.contiguous(), float(attention_scaling),
                                  out[0], out[1])
        return out[0], out[1]
    cos, sin = rotary_tables_reference(inv_freq, positions, attention_scaling)
    if out is None:
        return cos, sin
    return out[0].copy_(cos), out[1].copy_(sin)


def apply_rotary_(x, cos, sin, *, rotary_dim, interleaved=False, inverse=False, backend="auto", validate=True):
    """Rotate the first rotary_dim features of x (B, S, H, D) or (B, S, H, G, D) in place (any strides,
    the last dimension contiguous). A 5-D view covers several sub-heads of each head in one launch, e.g.
    q and k of a per-head fused projection [q_h | k_h | v_h]: its (B, S, H, 2, D) slice.

    Half-split layout pairs (i, i + rotary_dim / 2); interleaved pairs (2i, 2i + 1). cos, sin
    (S, rotary_dim // 2) float32, row s used for x[:, s]. inverse=True applies the backward.
    """
    if validate:
        if x.dim() not in (4, 5):
            raise ValueError(f"x must be (B, S, H, D) or (B, S, H, G, D), got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise ValueError(f"x must be floating point, got {x.dtype}")
        D = x.shape[-1]
        if not isinstance(rotary_dim, int) or rotary_dim <= 0 or rotary_dim % 2 or rotary_dim > D:
            raise ValueError(f"rotary_dim must be a positive even int <= head dim {D}, got {rotary_dim!r}")
        if D > 1 and x.stride(-1) != 1:
            raise ValueError(f"x's last dimension must be contiguous, got strides {x.stride()}")
        shape = (x.shape[1], rotary_dim // 2)
        for name, t in (("cos", cos), ("sin", sin)):
            if t.shape != shape or not t.is_floating_point() or t.device != x.device:
                raise ValueError(f"{name} must be a float tensor of shape {shape} on {x.device}, "
                                 f"got {t.dtype} {tuple(t.shape)} on {t.device}")
    why = None
    if cos.dtype != torch.float32 or sin.dtype != torch.float32:
        why = f"tables of dtype {cos.dtype}/{sin.dtype} (the kernel takes float32)"
    if _ext.use_kernel(backend, "apply_rotary_", x, cos, sin, why=why):
        _ext.load().apply_rotary_(x, cos.contiguous(), sin.contiguous(), int(rotary_dim), bool(interleaved),
                                  bool(inverse))
        return x
    return apply_rotary__reference(x, cos, sin, rotary_dim=rotary_dim, interleaved=interleaved, inverse=inverse)
