"""q/k/v projections of one layer from a ModelSpec, and their input gradient (no weight gradient).

Layouts (ModelSpec.qkv_layout):
  separate  q, k, v are three Linears
  concat    one Linear, output rows [q (Hq*hd) | k (Hkv*hd) | v (Hkv*hd)]   (GPT-2 c_attn)
  per_head  one Linear, output rows [h, 3, hd]: head h holds its q, k, v in turn   (GPT-NeoX)
q, k, v come back as (B, S, H, hd) views of the projection output (possibly strided), bias added,
rotary not applied.
"""
import torch
import torch.nn.functional as F

from .spec import Layer, ModelSpec


def _layer(spec: ModelSpec, layer) -> Layer:
    if isinstance(layer, Layer):
        return layer
    if isinstance(layer, bool) or not isinstance(layer, int) or not -spec.num_layers <= layer < spec.num_layers:
        raise ValueError(f"layer must be a Layer or an index in [0, {spec.num_layers}), got {layer!r}")
    return spec.layers[layer]


def _check_input(name, t, last, weight):
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a tensor, got {type(t).__name__}")
    if t.shape[-len(last):] != last or t.dim() < len(last) + 1:
        raise ValueError(f"{name} must have shape (..., {', '.join(map(str, last))}), got {tuple(t.shape)}")
    if t.dtype != weight.dtype or t.device != weight.device:
        raise ValueError(f"{name} is {t.dtype} on {t.device}, the weights are {weight.dtype} on {weight.device}")


def _weight(spec, L):
    return L.q.weight if spec.qkv_layout == "separate" else L.qkv.weight


def split_qkv(spec: ModelSpec, y: torch.Tensor):
    """y (B, S, out) laid out like the fused projection output -> (q, k, v, qk): (B, S, H, hd) views, and qk
    the view of q and k together: (B, S, H + Hkv, hd) for the [q | k | v] layouts ("separate" fused once per
    write, "concat"), (B, S, H, 2, hd) for "per_head" [q_h | k_h | v_h]."""
    H, Hkv, hd = spec.num_heads, spec.num_kv_heads, spec.head_dim
    if spec.qkv_layout == "per_head":
        heads = y.unflatten(-1, (H, 3, hd))
        q, k, v = heads.unbind(-2)
        return q, k, v, heads[..., :2, :]
    if spec.qkv_layout not in ("separate", "concat"):
        raise ValueError(f"spec.qkv_layout must be 'separate', 'concat' or 'per_head', got {spec.qkv_layout!r}")
    qk, v = y.split(((H + Hkv) * hd, Hkv * hd), dim=-1)
    qk = qk.unflatten(-1, (H + Hkv, hd))
    return qk[..., :H, :], qk[..., H:, :], v.unflatten(-1, (Hkv, hd)), qk


def qkv_project(spec: ModelSpec, layer, x: torch.Tensor, *, validate: bool = True):
    """x (B, S, d) -> q (B, S, Hq, hd), k (B, S, Hkv, hd), v (B, S, Hkv, hd)."""
    L = _layer(spec, layer)
    H, Hkv, hd = spec.num_heads, spec.num_kv_heads, spec.head_dim
    if validate:
        _check_input("x", x, (spec.hidden_size,), _weight(spec, L))
    if spec.qkv_layout == "separate":
        q = F.linear(x, L.q.weight, L.q.bias)
        k = F.linear(x, L.k.weight, L.k.bias)
        v = F.linear(x, L.v.weight, L.v.bias)
        return q.unflatten(-1, (H, hd)), k.unflatten(-1, (Hkv, hd)), v.unflatten(-1, (Hkv, hd))
    return split_qkv(spec, F.linear(x, L.qkv.weight, L.qkv.bias))[:3]


def qkv_project_backward(spec: ModelSpec, layer, dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor,
                         *, validate: bool = True) -> torch.Tensor:
    """Input gradient of qkv_project: dx (B, S, d) = sum over q, k, v of dY @ W (bias and weights get none)."""
    L = _layer(spec, layer)
    H, Hkv, hd = spec.num_heads, spec.num_kv_heads, spec.head_dim
    if validate:
        w = _weight(spec, L)
        _check_input("dq", dq, (H, hd), w)
        _check_input("dk", dk, (Hkv, hd), w)
        _check_input("dv", dv, (Hkv, hd), w)
        if not dq.shape[:-2] == dk.shape[:-2] == dv.shape[:-2]:
            raise ValueError(f"dq, dk, dv leading shapes differ: {tuple(dq.shape)}, {tuple(dk.shape)}, "
                             f"{tuple(dv.shape)}")
    lead = dq.shape[:-2]
    if spec.qkv_layout == "separate":
        dx = torch.addmm(torch.mm(dq.reshape(-1, H * hd), L.q.weight), dk.reshape(-1, Hkv * hd), L.k.weight)
        dx = torch.addmm(dx, dv.reshape(-1, Hkv * hd), L.v.weight)
        return dx.view(*lead, -1)
    if spec.qkv_layout == "concat":
        dy = torch.cat((dq.flatten(-2), dk.flatten(-2), dv.flatten(-2)), dim=-1)
    elif spec.qkv_layout == "per_head":
        dy = torch.stack((dq, dk, dv), dim=-2).flatten(-3)
    else:
        raise ValueError(f"spec.qkv_layout must be 'separate', 'concat' or 'per_head', got {spec.qkv_layout!r}")
    return torch.matmul(dy, L.qkv.weight)
