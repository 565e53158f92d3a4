"""A supported Hugging Face causal LM described as plain data the fast engine can run.

All tensors are views of the model's own parameters (no copies). Linear weights are stored
`(out_features, in_features)` as in `nn.Linear`; GPT-2's Conv1D weights appear transposed
(a view).
Tensors are the parameters themselves or autograd views of them (never detached), so gradients can
flow into the weights when a caller asks for them. Dropout is not described: the spec has eval
semantics.
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
    offset: float = 0.0  # the norm scales by (offset + weight): 1.0 for Gemma's RMSNorm, else 0.0


@dataclass(frozen=True)
class Rotary:
    inv_freq: torch.Tensor  # (rotary_dim // 2,) the model's buffer (float32 unless cast), scaling applied
    rotary_dim: int  # head_dim for full rotary, less for partial (GPT-NeoX rotary_pct)
    attention_scaling: float  # multiplies cos and sin (1.0 unless a scaling type sets it)
    interleaved: bool  # False: half-split layout (Llama, NeoX); True: pairs (2i, 2i+1)


@dataclass(frozen=True)
class Layer:
    """One block. Which norms are present gives its structure (ModelSpec.block):
    pre-norm       attn_norm, mlp_norm                    h1 = h + attn(n1(h));  h2 = h1 + mlp(n2(h1))
    post-norm      post_attn_norm, post_mlp_norm          h1 = h + n1(attn(h));  h2 = h1 + n2(mlp(h1))
    sandwich       all four                               h1 = h + n1'(attn(n1(h)));  h2 = h1 + n2'(mlp(n2(h1)))
    parallel       attn_norm, mlp_norm (parallel_residual) h' = h + attn(n1(h)) + mlp(n2(h))
    """
    attn_norm: Optional[Norm]  # before attention; None in a post-norm block
    # qkv layout, see ModelSpec.qkv_layout: "separate" uses q, k, v; "concat" and "per_head" use qkv
    q: Optional[Linear]
    k: Optional[Linear]
    v: Optional[Linear]
    qkv: Optional[Linear]
    o: Linear
    mlp_norm: Optional[Norm]  # before the MLP; None in a post-norm block
    gate: Optional[Linear]  # gated MLP (GATED activations) only
    up: Linear
    down: Linear
    post_attn_norm: Optional[Norm] = None  # on the attention output, before the residual add
    post_mlp_norm: Optional[Norm] = None  # on the MLP output, before the residual add
    # RMS norms of q and k (ModelSpec.qk_norm): weight (head_dim,) per head, or (H * head_dim,) and
    # (Hkv * head_dim,) over the whole projection
    q_norm: Optional[Norm] = None
    k_norm: Optional[Norm] = None
    rotary: Optional[Rotary] = None  # this layer's own rotary (Gemma 3's local layers); None: ModelSpec.rotary


@dataclass(frozen=True)
class ModelSpec:
    family: str  # the adapter: "llama" (Llama, Mistral, Qwen2, Qwen3), "olmo2", "phi3", "gpt2", "gpt_neox"
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    norm_kind: str  # "rms" or "layer"
    activation: str  # "swiglu", "geglu_tanh" (gated, Gemma), "gelu_tanh" or "gelu"
    qkv_layout: str  # "separate", "concat" (q|k|v blocks, GPT-2) or "per_head" ([h, 3, hd], NeoX)
    parallel_residual: bool  # GPT-NeoX use_parallel_residual
    attn_scale: float  # softmax scale, usually head_dim ** -0.5
    rotary: Optional[Rotary]
    position_embedding: Optional[torch.Tensor]  # (max_positions, d) learned (GPT-2), else None
    # sequence-length limit where the model has a hard one (GPT-2 n_positions), or the sliding window
    # (Mistral, Qwen2): up to it a sliding-window model attends plainly causally; else None
    max_positions: Optional[int]
    embedding: torch.Tensor  # (V, d)
    final_norm: Norm
    lm_head: Linear  # (V, d), bias when the model's head has one
    tied_head: bool
    layers: Tuple[Layer, ...]
    # RMS norm of q and k before rotary: "head" over each head's head_dim dims (Qwen3, Gemma 3), "full"
    # over the whole q (H * head_dim) and k (Hkv * head_dim) projection (OLMo 2), None: no q/k norm
    qk_norm: Optional[str] = None
    # multiplies the token embeddings (Gemma: sqrt(d), rounded to the model dtype); None: no scaling. The
    # memory rows are not scaled (they enter after the embedding).
    embedding_scale: Optional[float] = None

    @property
    def block(self) -> str:
        """"pre", "post", "sandwich" or "parallel" (Layer); every layer has the same structure."""
        if self.parallel_residual:
            return "parallel"
        layer = self.layers[0]
        if layer.attn_norm is None:
            return "post"
        return "pre" if layer.post_attn_norm is None else "sandwich"


class UnsupportedModel(ValueError):
    """The model cannot be described as a ModelSpec; the message says why."""


def norm_of(module, kind: str) -> Norm:
    """Norm from an HF RMSNorm (`weight`, `variance_epsilon`) or an `nn.LayerNorm`."""
    if kind == "rms":
        eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
        if getattr(module, "weight", None) is None or eps is None:
            raise UnsupportedModel(f"RMS norm {type(module).__name__} has no weight/eps")
        return Norm(weight=module.weight, bias=None, eps=float(eps))
    if not isinstance(module, torch.nn.LayerNorm) or module.weight is None:
        raise UnsupportedModel(f"norm {type(module).__name__} is not an affine nn.LayerNorm")
    if tuple(module.normalized_shape) != (module.weight.shape[0],):
        raise UnsupportedModel(f"LayerNorm over {tuple(module.normalized_shape)} is not a last-dim norm")
    return Norm(weight=module.weight, bias=module.bias, eps=float(module.eps))


def linear_of(module) -> Linear:
    """Linear from an `nn.Linear`, or from an HF Conv1D (weight (in, out)) viewed transposed."""
    if isinstance(module, torch.nn.Linear):
        return Linear(weight=module.weight, bias=module.bias)
    if type(module).__name__ == "Conv1D" and getattr(module, "weight", None) is not None:
        return Linear(weight=module.weight.t(), bias=module.bias)
    raise UnsupportedModel(f"projection {type(module).__name__} is neither nn.Linear nor Conv1D")


# rope types whose frequencies are fixed at construction (the forward only reads inv_freq and
# attention_scaling); "dynamic" and "longrope" recompute them from the sequence length
STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")

GATED = ("swiglu", "geglu_tanh")  # act(gate(x)) * up(x)

ACTIVATIONS = {
    "silu": "silu",
    "swish": "silu",
    "gelu": "gelu",
    "gelu_python": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
}


def rotary_of(rotary_emb, rotary_dim: int) -> Rotary:
    """Rotary from an HF rotary embedding module whose frequencies cover `rotary_dim` dims."""
    rope_type = getattr(rotary_emb, "rope_type", None)
    if not isinstance(rope_type, str):
        raise UnsupportedModel(f"rope type {rope_type!r} (per-layer rope) cannot be expressed")
    if rope_type not in STATIC_ROPE_TYPES:
        raise UnsupportedModel(
            f"rope type '{rope_type}' cannot be expressed (supported: {', '.join(STATIC_ROPE_TYPES)})")
    inv_freq = rotary_emb.inv_freq
    if inv_freq.dim() != 1 or 2 * inv_freq.shape[0] != rotary_dim:
        raise UnsupportedModel(
            f"rotary inv_freq of shape {tuple(inv_freq.shape)} does not cover rotary_dim {rotary_dim}")
    return Rotary(inv_freq=inv_freq, rotary_dim=rotary_dim,
                  attention_scaling=float(rotary_emb.attention_scaling), interleaved=False)


def uniform(values, what: str):
    """The single value shared by all layers, or UnsupportedModel."""
    values = list(values)
    if any(v != values[0] for v in values):
        raise UnsupportedModel(f"{what} differs between layers ({values}); the spec holds one value")
    return values[0]


def head_of(model, embedding: torch.Tensor):
    """(lm_head Linear, tied) from the model's output embeddings."""
    cfg = model.config
    for name in ("final_logit_softcapping", "attn_logit_softcapping"):
        if getattr(cfg, name, None) is not None:
            raise UnsupportedModel(f"{name}={getattr(cfg, name)} is not supported")
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, torch.nn.Linear):
        raise UnsupportedModel(f"{type(model).__name__} has no linear LM head (use a *ForCausalLM model)")
    if head.bias is not None:
        raise UnsupportedModel("LM head with bias is not supported")
    if head.weight.shape != embedding.shape:
        raise UnsupportedModel(
            f"LM head of shape {tuple(head.weight.shape)} does not match embedding {tuple(embedding.shape)}")
    tied = head.weight is embedding or (
        head.weight.data_ptr() == embedding.data_ptr() and head.weight.stride() == embedding.stride())
    return Linear(weight=head.weight, bias=None), tied


def check_loaded(model):
    for name, p in model.named_parameters():
        if p.device.type == "meta":
            raise UnsupportedModel(f"parameter {name} is on the meta device (weights not loaded)")
        if not p.is_floating_point():
            raise UnsupportedModel(f"parameter {name} has dtype {p.dtype} (quantized weights are not supported)")
