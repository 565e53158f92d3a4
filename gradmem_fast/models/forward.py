"""Plain PyTorch forward of a ModelSpec: eager softmax attention, causal + key padding mask.

Mirrors the Hugging Face numerics: RMSNorm, rotary angles and the softmax run in float32 (or
float64 for float64 inputs) and are cast back to the input dtype.
"""
import torch
import torch.nn.functional as F

from ..ops.dtypes import acc_dtype as _acc
from .qkv import qkv_project
from .spec import Linear, ModelSpec, Norm, Rotary


def linear(x, lin: Linear):
    return F.linear(x, lin.weight, lin.bias)


def rms_norm(n: Norm, x):
    xf = x.to(_acc(x.dtype))
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + n.eps)
    if n.offset:  # Gemma: scaled by (1 + w) in the accumulation dtype, then cast
        return (y * (n.offset + n.weight.to(y.dtype))).to(x.dtype)
    return n.weight * y.to(x.dtype)


def norm(spec: ModelSpec, n: Norm, x):
    """n(x) over the last dim; x itself when n is None (a block without that norm)."""
    if n is None:
        return x
    if spec.norm_kind == "rms":
        return rms_norm(n, x)
    return F.layer_norm(x, (x.shape[-1],), n.weight, n.bias, n.eps)


def qk_norm(spec: ModelSpec, layer, q, k):
    """q (B, S, H, hd), k (B, S, Hkv, hd) after their RMS norms (ModelSpec.qk_norm), before rotary."""
    if spec.qk_norm is None:
        return q, k
    if spec.qk_norm == "head":
        return rms_norm(layer.q_norm, q), rms_norm(layer.k_norm, k)
    return (rms_norm(layer.q_norm, q.flatten(-2)).view(q.shape),
            rms_norm(layer.k_norm, k.flatten(-2)).view(k.shape))


def layer_rotary(spec: ModelSpec, layer):
    """The layer's Rotary: its own where it has one (Layer.rotary), else the model's (None: no rotary)."""
    return spec.rotary if layer.rotary is None else layer.rotary


def rotary_cos_sin(rotary: Rotary, seq_len: int, dtype, device):
    """cos, sin (S, rotary_dim) for positions 0..S-1, attention_scaling applied, in `dtype`."""
    acc = _acc(dtype)
    pos = torch.arange(seq_len, device=device, dtype=acc)
    freqs = pos[:, None] * rotary.inv_freq.to(device=device, dtype=acc)[None, :]
    emb = freqs.repeat_interleave(2, dim=-1) if rotary.interleaved else torch.cat((freqs, freqs), dim=-1)
    return (emb.cos() * rotary.attention_scaling).to(dtype), (emb.sin() * rotary.attention_scaling).to(dtype)


def apply_rotary(rotary: Rotary, x, cos, sin):
    """x (B, S, H, hd) with its first rotary_dim dims rotated; cos, sin (S, rotary_dim)."""
    rd = rotary.rotary_dim
    x_rot, x_pass = x[..., :rd], x[..., rd:]
    cos, sin = cos[:, None, :], sin[:, None, :]
    if rotary.interleaved:
        x1, x2 = x_rot[..., 0::2], x_rot[..., 1::2]
        rotated = torch.stack((-x2, x1), dim=-1).flatten(-2)
    else:
        x1, x2 = x_rot[..., : rd // 2], x_rot[..., rd // 2:]
        rotated = torch.cat((-x2, x1), dim=-1)
    out = x_rot * cos + rotated * sin
    return torch.cat((out, x_pass), dim=-1) if x_pass.shape[-1] else out


def attention(q, k, v, scale: float, key_valid=None):
    """Causal softmax attention. q (B, S, Hq, hd), k/v (B, S, Hkv, hd), key_valid (B, S) bool or None.
    Returns (B, S, Hq * hd)."""
    B, S, Hq, hd = q.shape
    groups = Hq // k.shape[2]
    qh = q.transpose(1, 2)
    kh = k.transpose(1, 2).repeat_interleave(groups, dim=1)
    vh = v.transpose(1, 2).repeat_interleave(groups, dim=1)
    scores = torch.matmul(qh, kh.transpose(-1, -2)) * scale  # (B, Hq, S, S)
    allowed = torch.ones(S, S, dtype=torch.bool, device=q.device).tril()
    if key_valid is not None:
        allowed = allowed & key_valid[:, None, None, :]
    scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1, dtype=_acc(q.dtype)).to(q.dtype)
    return torch.matmul(probs, vh).transpose(1, 2).reshape(B, S, Hq * hd)


def mlp(spec: ModelSpec, layer, x):
    if spec.activation == "swiglu":
        return linear(F.silu(linear(x, layer.gate)) * linear(x, layer.up), layer.down)
    if spec.activation == "geglu_tanh":
        return linear(F.gelu(linear(x, layer.gate), approximate="tanh") * linear(x, layer.up), layer.down)
    approximate = "tanh" if spec.activation == "gelu_tanh" else "none"
    return linear(F.gelu(linear(x, layer.up), approximate=approximate), layer.down)


def _validate(spec, x, lengths):
    if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != spec.hidden_size:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"inputs_embeds must have shape (B, S, {spec.hidden_size}), got {shape}")
    if x.shape[1] < 1 or x.shape[0] < 1:
        raise ValueError(f"inputs_embeds must be non-empty, got shape {tuple(x.shape)}")
    if x.dtype != spec.embedding.dtype or x.device != spec.embedding.device:
        raise ValueError(f"inputs_embeds is {x.dtype} on {x.device}, the model is {spec.embedding.dtype} "
                         f"on {spec.embedding.device}")
    if spec.max_positions is not None and x.shape[1] > spec.max_positions:
        raise ValueError(f"sequence length {x.shape[1]} exceeds the model's max_positions {spec.max_positions}")
    if lengths is not None:
        if not isinstance(lengths, torch.Tensor) or lengths.shape != (x.shape[0],):
            raise ValueError(f"lengths must be a tensor of shape ({x.shape[0]},), got "
                             f"{tuple(lengths.shape) if isinstance(lengths, torch.Tensor) else lengths!r}")
        if lengths.is_floating_point() or lengths.is_complex() or lengths.device != x.device:
            raise ValueError(f"lengths must be an integer tensor on {x.device}, got {lengths.dtype} on "
                             f"{lengths.device}")


def forward_hidden(spec: ModelSpec, inputs_embeds: torch.Tensor, lengths=None, *, validate: bool = True):
    """Final-norm hidden states (B, S, d) for inputs_embeds (B, S, d) at positions 0..S-1.

    lengths (B,): valid rows per sample (right padding); keys at or beyond a sample's length are
    masked. None: all rows valid. Learned position embeddings are added here.
    """
    if validate:
        _validate(spec, inputs_embeds, lengths)
    B, S, _ = inputs_embeds.shape
    h = inputs_embeds
    if spec.position_embedding is not None:
        h = h + spec.position_embedding[:S]
    key_valid = None
    if lengths is not None:
        key_valid = torch.arange(S, device=h.device)[None, :] < lengths[:, None]
    tables = {}  # id(rotary) -> (cos, sin)
    for layer in spec.layers:
        q, k, v = qkv_project(spec, layer, norm(spec, layer.attn_norm, h), validate=False)
        q, k = qk_norm(spec, layer, q, k)
        rotary = layer_rotary(spec, layer)
        if rotary is not None:
            if id(rotary) not in tables:
                tables[id(rotary)] = rotary_cos_sin(rotary, S, h.dtype, h.device)
            cos, sin = tables[id(rotary)]
            q, k = apply_rotary(rotary, q, cos, sin), apply_rotary(rotary, k, cos, sin)
        a = linear(attention(q, k, v, spec.attn_scale, key_valid), layer.o)
        if spec.parallel_residual:
            h = mlp(spec, layer, norm(spec, layer.mlp_norm, h)) + a + h
        else:
            h = h + norm(spec, layer.post_attn_norm, a)
            h = h + norm(spec, layer.post_mlp_norm, mlp(spec, layer, norm(spec, layer.mlp_norm, h)))
    return norm(spec, spec.final_norm, h)
