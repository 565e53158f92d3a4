"""Llama-family adapter: Llama, Mistral, Qwen2 (RMSNorm, SwiGLU, half-split rotary, GQA)."""
from .spec import (ACTIVATIONS, Layer, ModelSpec, UnsupportedModel, check_loaded, head_of, linear_of,
                   norm_of, rotary_of, uniform)


def _sliding_window(model, layers):
    cfg = model.config
    if cfg.model_type == "mistral":
        return getattr(cfg, "sliding_window", None)
    windows = [getattr(layer.self_attn, "sliding_window", None) for layer in layers]
    windows = [w for w in windows if w is not None]
    return min(windows) if windows else None


def describe(model) -> ModelSpec:
    cfg = model.config
    check_loaded(model)
    base = getattr(model, "model", None)
    if base is None or not hasattr(base, "layers") or not hasattr(base, "rotary_emb"):
        raise UnsupportedModel(f"{type(model).__name__} does not have the Llama module layout "
                               "(model.layers, model.rotary_emb)")
    act = ACTIVATIONS.get(getattr(cfg, "hidden_act", None))
    if act != "silu":
        raise UnsupportedModel(f"hidden_act '{cfg.hidden_act}' is not supported for {cfg.model_type} (needs silu)")
    layers = list(base.layers[: cfg.num_hidden_layers])
    attn0 = layers[0].self_attn
    head_dim = attn0.head_dim
    num_heads = attn0.q_proj.out_features // head_dim
    num_kv_heads = attn0.k_proj.out_features // head_dim
    if num_heads * head_dim != attn0.q_proj.out_features or num_heads % num_kv_heads:
        raise UnsupportedModel(f"q/k projections {attn0.q_proj.out_features}/{attn0.k_proj.out_features} "
                               f"do not split into heads of {head_dim}")
    scale = float(uniform((layer.self_attn.scaling for layer in layers), "attention scaling"))
    rotary = rotary_of(base.rotary_emb, head_dim)

    spec_layers = []
    for layer in layers:
        a, mlp = layer.self_attn, layer.mlp
        spec_layers.append(Layer(
            attn_norm=norm_of(layer.input_layernorm, "rms"),
            q=linear_of(a.q_proj), k=linear_of(a.k_proj), v=linear_of(a.v_proj), qkv=None,
            o=linear_of(a.o_proj),
            mlp_norm=norm_of(layer.post_attention_layernorm, "rms"),
            gate=linear_of(mlp.gate_proj), up=linear_of(mlp.up_proj), down=linear_of(mlp.down_proj),
        ))
    embedding = base.embed_tokens.weight
    lm_head, tied = head_of(model, embedding)
    return ModelSpec(
        family="llama", hidden_size=embedding.shape[1], num_layers=len(spec_layers),
        num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim, vocab_size=embedding.shape[0],
        norm_kind="rms", activation="swiglu", qkv_layout="separate", parallel_residual=False,
        attn_scale=scale, rotary=rotary, position_embedding=None,
        max_positions=_sliding_window(model, layers), embedding=embedding,
        final_norm=norm_of(base.norm, "rms"), lm_head=lm_head, tied_head=tied, layers=tuple(spec_layers),
    )
