"""Llama-family adapter: Llama, Mistral, Qwen2, Qwen3 (RMSNorm, SwiGLU, half-split rotary, GQA; Qwen3 adds
a per-head RMS norm of q and k). `llama_like` also serves the families that share the module layout."""
from .spec import (ACTIVATIONS, Layer, ModelSpec, UnsupportedModel, check_loaded, head_of, linear_of,
                   norm_of, rotary_of, uniform)


def _sliding_window(model, layers):
    cfg = model.config
    if cfg.model_type == "mistral":
        return getattr(cfg, "sliding_window", None)
    windows = [getattr(layer.self_attn, "sliding_window", None) for layer in layers]
    windows = [w for w in windows if w is not None]
    return min(windows) if windows else None


def base_layers(model, required=("layers", "rotary_emb")):
    """(model.model, its first num_hidden_layers layers); UnsupportedModel without that layout."""
    base = getattr(model, "model", None)
    if base is None or not all(hasattr(base, name) for name in required):
        raise UnsupportedModel(f"{type(model).__name__} does not have the Llama module layout "
                               f"({', '.join('model.' + name for name in required)})")
    return base, list(base.layers[: model.config.num_hidden_layers])


def check_silu(cfg):
    if ACTIVATIONS.get(getattr(cfg, "hidden_act", None)) != "silu":
        raise UnsupportedModel(f"hidden_act '{cfg.hidden_act}' is not supported for {cfg.model_type} (needs silu)")


def heads_of(parts, head_dim, cfg):
    """(num_heads, num_kv_heads) of a layer's parts (Layer fields): from the q and k projections, or for a
    fused [q | k | v] projection from the config, checked against its size."""
    if parts["q"] is not None:
        q_out, k_out = parts["q"].weight.shape[0], parts["k"].weight.shape[0]
        num_heads, num_kv_heads = q_out // head_dim, k_out // head_dim
        ok = num_heads * head_dim == q_out and num_kv_heads * head_dim == k_out
    else:
        num_heads = cfg.num_attention_heads
        num_kv_heads = getattr(cfg, "num_key_value_heads", None) or num_heads
        q_out, k_out = parts["qkv"].weight.shape[0], num_kv_heads * head_dim
        ok = q_out == (num_heads + 2 * num_kv_heads) * head_dim
    if not ok or num_kv_heads == 0 or num_heads % num_kv_heads:
        raise UnsupportedModel(f"q/k projections {q_out}/{k_out} do not split into heads of {head_dim}")
    return num_heads, num_kv_heads


def qk_norms(attn, head_dim, num_heads, num_kv_heads):
    """(q_norm, k_norm, mode) of an attention module: mode "head" for norms over head_dim, "full" over the
    whole projections; (None, None, None) without them."""
    if getattr(attn, "q_norm", None) is None and getattr(attn, "k_norm", None) is None:
        return None, None, None
    q_norm, k_norm = norm_of(attn.q_norm, "rms"), norm_of(attn.k_norm, "rms")
    shapes = (q_norm.weight.shape[0], k_norm.weight.shape[0])
    if shapes == (head_dim, head_dim):
        return q_norm, k_norm, "head"
    if shapes == (num_heads * head_dim, num_kv_heads * head_dim):
        return q_norm, k_norm, "full"
    raise UnsupportedModel(f"q/k norms of sizes {shapes} are neither per head ({head_dim}) nor over the "
                           f"projections ({num_heads * head_dim}, {num_kv_heads * head_dim})")


def llama_like(model, family, parts_of, *, rotary_dim=None, max_positions=None):
    """The ModelSpec of a model with the Llama module layout (model.layers[i].self_attn, .mlp, model.norm,
    model.rotary_emb, SwiGLU). parts_of(layer) -> the Layer fields but the q/k norms, which are read from
    self_attn.q_norm / k_norm where present. rotary_dim: default head_dim; max_positions: default the
    layers' sliding window."""
    cfg = model.config
    check_loaded(model)
    check_silu(cfg)
    base, layers = base_layers(model)
    head_dim = layers[0].self_attn.head_dim
    parts = [parts_of(layer) for layer in layers]
    num_heads, num_kv_heads = heads_of(parts[0], head_dim, cfg)
    scale = float(uniform((layer.self_attn.scaling for layer in layers), "attention scaling"))
    rotary = rotary_of(base.rotary_emb, head_dim if rotary_dim is None else rotary_dim)
    norms = [qk_norms(layer.self_attn, head_dim, num_heads, num_kv_heads) for layer in layers]
    qk_mode = uniform((mode for _, _, mode in norms), "q/k norm")
    spec_layers = tuple(Layer(q_norm=q_norm, k_norm=k_norm, **p) for p, (q_norm, k_norm, _) in zip(parts, norms))
    embedding = base.embed_tokens.weight
    lm_head, tied = head_of(model, embedding)
    return ModelSpec(
        family=family, hidden_size=embedding.shape[1], num_layers=len(spec_layers),
        num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim, vocab_size=embedding.shape[0],
        norm_kind="rms", activation="swiglu", qkv_layout="separate" if parts[0]["q"] is not None else "concat",
        parallel_residual=False, attn_scale=scale, rotary=rotary, position_embedding=None,
        max_positions=_sliding_window(model, layers) if max_positions is None else max_positions,
        embedding=embedding, final_norm=norm_of(base.norm, "rms"), lm_head=lm_head, tied_head=tied,
        layers=spec_layers, qk_norm=qk_mode,
    )


def _pre_norm_parts(layer):
    a, mlp = layer.self_attn, layer.mlp
    return dict(attn_norm=norm_of(layer.input_layernorm, "rms"),
                q=linear_of(a.q_proj), k=linear_of(a.k_proj), v=linear_of(a.v_proj), qkv=None, o=linear_of(a.o_proj),
                mlp_norm=norm_of(layer.post_attention_layernorm, "rms"),
                gate=linear_of(mlp.gate_proj), up=linear_of(mlp.up_proj), down=linear_of(mlp.down_proj))


def describe(model) -> ModelSpec:
    return llama_like(model, "llama", _pre_norm_parts)
