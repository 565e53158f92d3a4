"""A supported Hugging Face causal LM described as plain data the fast engine can run.

All tensors are views of the model's own parameters (no copies). Linear weights are stored
`(out_features, in_features)` as in `nn.Linear`; GPT-2's Conv1D weights appear transposed
(a view).
"""
from dataclasses import dataclass
from typing import Optional, Tuple

import torch


@dataclass(frozen=True)
class Linear:
    weight: torch.Tensor  # (out, in)
    bias: Optional[torch.Tensor] = None  # (out,)


@dataclass(frozen=True)
class Norm:
    weight: torch.Tensor  # (d,)
    bias: Optional[torch.Tensor]  # (d,) for LayerNorm with bias, else None
    eps: float


@dataclass(frozen=True)
class Rotary:
    inv_freq: torch.Tensor  # (rotary_dim // 2,) float32, scaling already applied by the model
    rotary_dim: int  # head_dim for full rotary, less for partial (GPT-NeoX rotary_pct)
    attention_scaling: float  # multiplies cos and sin (1.0 unless a scaling type sets it)
    interleaved: bool  # False: half-split layout (Llama, NeoX); True: pairs (2i, 2i+1)


@dataclass(frozen=True)
class Layer:
    attn_norm: Norm
    # qkv layout, see ModelSpec.qkv_layout: "separate" uses q, k, v; "concat" and "per_head" use qkv
    q: Optional[Linear]
    k: Optional[Linear]
    v: Optional[Linear]
    qkv: Optional[Linear]
    o: Linear
    mlp_norm: Norm
    gate: Optional[Linear]  # gated MLP (SwiGLU) only
    up: Linear
    down: Linear


@dataclass(frozen=True)
class ModelSpec:
    family: str  # "llama" (Llama, Mistral, Qwen2), "gpt2", "gpt_neox"
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    norm_kind: str  # "rms" or "layer"
    activation: str  # "swiglu", "gelu_tanh" or "gelu"
    qkv_layout: str  # "separate", "concat" (q|k|v blocks, GPT-2) or "per_head" ([h, 3, hd], NeoX)
    parallel_residual: bool  # GPT-NeoX use_parallel_residual
    attn_scale: float  # softmax scale, usually head_dim ** -0.5
    rotary: Optional[Rotary]
    position_embedding: Optional[torch.Tensor]  # (max_positions, d) learned (GPT-2), else None
    max_positions: Optional[int]  # position limit where the model has a hard one, else None
    embedding: torch.Tensor  # (V, d)
    final_norm: Norm
    lm_head: Linear  # (V, d), bias when the model's head has one
    tied_head: bool
    layers: Tuple[Layer, ...]
