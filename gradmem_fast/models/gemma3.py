"""Gemma 3 (text) adapter: sandwich blocks (RMS norms before and after each sublayer), RMSNorm scaling by
(1 + w), GeGLU with the tanh GELU, a per-head RMS norm of q and k, the attention scale from
query_pre_attn_scalar, embeddings scaled by sqrt(d), local (sliding-window) layers with their own rotary.

The sliding-window layers are expressed while m + T fits the window (ModelSpec.max_positions), where they
attend plainly causally; beyond it the engine refuses and says why, as for Mistral."""
import dataclasses

import torch

from .llama import base_layers, heads_of, qk_norms
from .spec import (ACTIVATIONS, STATIC_ROPE_TYPES, Layer, ModelSpec, Rotary, UnsupportedModel, check_loaded,
                   head_of, linear_of, norm_of, uniform)


def _norm(module):
    return dataclasses.replace(norm_of(module, "rms"), offset=1.0)


def _rotary(rotary_emb, layer_type, rotary_dim):
    """The Rotary of one layer type from Gemma 3's rotary module, which holds one inv_freq per layer type."""
    rope_types = getattr(rotary_emb, "rope_type", None)
    rope_type = rope_types.get(layer_type) if isinstance(rope_types, dict) else rope_types
    if rope_type not in STATIC_ROPE_TYPES:
        raise UnsupportedModel(
            f"rope type {rope_type!r} of {layer_type} layers cannot be expressed (supported: "
            f"{', '.join(STATIC_ROPE_TYPES)})")
    inv_freq = getattr(rotary_emb, f"{layer_type}_inv_freq", None)
    if inv_freq is None:
        inv_freq = rotary_emb.inv_freq
    if inv_freq.dim() != 1 or 2 * inv_freq.shape[0] != rotary_dim:
        raise UnsupportedModel(
            f"rotary inv_freq of shape {tuple(inv_freq.shape)} does not cover rotary_dim {rotary_dim}")
    scaling = getattr(rotary_emb, f"{layer_type}_attention_scaling", getattr(rotary_emb, "attention_scaling", 1.0))
    return Rotary(inv_freq=inv_freq, rotary_dim=rotary_dim, attention_scaling=float(scaling), interleaved=False)


def _embedding_scale(embed_tokens, dtype):
    """The scale the embedding module's forward applies: its embed_scale buffer cast to the model dtype (read
    once, here: describe() is cached per model)."""
    buffer = getattr(embed_tokens, "embed_scale", None)
    if isinstance(buffer, torch.Tensor) and buffer.numel() == 1:
        return float(buffer.to(dtype))
    scale = getattr(embed_tokens, "scalar_embed_scale", None)
    if scale is None:
        raise UnsupportedModel(f"{type(embed_tokens).__name__} has no embed_scale")
    return float(torch.tensor(float(scale)).to(dtype))


def describe(model) -> ModelSpec:
    cfg = model.config
    check_loaded(model)
    act = ACTIVATIONS.get(getattr(cfg, "hidden_activation", None))
    if act != "gelu_tanh":
        raise UnsupportedModel(f"hidden_activation '{cfg.hidden_activation}' is not supported for gemma3_text "
                               "(needs gelu_pytorch_tanh)")
    if getattr(cfg, "use_bidirectional_attention", False):
        raise UnsupportedModel("use_bidirectional_attention=True is not causal")
    base, layers = base_layers(model)
    head_dim = layers[0].self_attn.head_dim
    layer_types = list(getattr(cfg, "layer_types", None) or ["full_attention"] * len(layers))
    rotaries = {t: _rotary(base.rotary_emb, t, head_dim) for t in sorted(set(layer_types))}
    global_type = "full_attention" if "full_attention" in rotaries else layer_types[0]
    spec_layers, num_heads = [], None
    for layer, layer_type in zip(layers, layer_types):
        a, mlp = layer.self_attn, layer.mlp
        parts = dict(attn_norm=_norm(layer.input_layernorm), q=linear_of(a.q_proj), k=linear_of(a.k_proj),
                     v=linear_of(a.v_proj), qkv=None, o=linear_of(a.o_proj),
                     mlp_norm=_norm(layer.pre_feedforward_layernorm), gate=linear_of(mlp.gate_proj),
                     up=linear_of(mlp.up_proj), down=linear_of(mlp.down_proj),
                     post_attn_norm=_norm(layer.post_attention_layernorm),
                     post_mlp_norm=_norm(layer.post_feedforward_layernorm))
        if num_heads is None:
            num_heads, num_kv_heads = heads_of(parts, head_dim, cfg)
        q_norm, k_norm, mode = qk_norms(a, head_dim, num_heads, num_kv_heads)
        if mode != "head":
            raise UnsupportedModel(f"Gemma 3 q/k norms of mode {mode!r} (expected per head)")
        rotary = None if layer_type == global_type else rotaries[layer_type]
        spec_layers.append(Layer(q_norm=dataclasses.replace(q_norm, offset=1.0),
                                 k_norm=dataclasses.replace(k_norm, offset=1.0), rotary=rotary, **parts))
    scale = float(uniform((layer.self_attn.scaling for layer in layers), "attention scaling"))
    windows = [layer.self_attn.sliding_window for layer in layers if getattr(layer.self_attn, "sliding_window", None)]
    embedding = base.embed_tokens.weight
    lm_head, tied = head_of(model, embedding)
    return ModelSpec(
        family="gemma3_text", hidden_size=embedding.shape[1], num_layers=len(spec_layers),
        num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim, vocab_size=embedding.shape[0],
        norm_kind="rms", activation="geglu_tanh", qkv_layout="separate", parallel_residual=False,
        attn_scale=scale, rotary=rotaries[global_type], position_embedding=None,
        max_positions=min(windows) if windows else None, embedding=embedding, final_norm=_norm(base.norm),
        lm_head=lm_head, tied_head=tied, layers=tuple(spec_layers), qk_norm="head",
        embedding_scale=_embedding_scale(base.embed_tokens, embedding.dtype),
    )
