"""GPT-NeoX / Pythia adapter: LayerNorm, fused query_key_value ("per_head" layout [h, 3, hd]),
partial rotary, parallel or sequential residual, exact GELU."""
from .spec import (ACTIVATIONS, Layer, ModelSpec, UnsupportedModel, check_loaded, head_of, linear_of,
                   norm_of, rotary_of, uniform)


def describe(model) -> ModelSpec:
    cfg = model.config
    check_loaded(model)
    base = getattr(model, "gpt_neox", None)
    if base is None or not hasattr(base, "layers") or not hasattr(base, "rotary_emb"):
        raise UnsupportedModel(f"{type(model).__name__} does not have the GPT-NeoX module layout "
                               "(gpt_neox.layers, gpt_neox.rotary_emb)")
    act = ACTIVATIONS.get(getattr(cfg, "hidden_act", None))
    if act not in ("gelu", "gelu_tanh"):
        raise UnsupportedModel(f"hidden_act '{cfg.hidden_act}' is not supported for gpt_neox "
                               "(supported: gelu, gelu_new, gelu_pytorch_tanh)")
    layers = list(base.layers)
    attn0 = layers[0].attention
    head_dim = attn0.head_size
    hidden = base.embed_in.weight.shape[1]
    num_heads = hidden // head_dim
    if attn0.query_key_value.out_features != 3 * num_heads * head_dim:
        raise UnsupportedModel(f"query_key_value with {attn0.query_key_value.out_features} outputs does not "
                               f"hold {num_heads} heads of 3 x {head_dim}")
    scale = float(uniform((layer.attention.scaling for layer in layers), "attention scaling"))
    rotary_dim = int(uniform((layer.attention.rotary_ndims for layer in layers), "rotary_ndims"))
    parallel = bool(uniform((layer.use_parallel_residual for layer in layers), "use_parallel_residual"))
    rotary = rotary_of(base.rotary_emb, rotary_dim) if rotary_dim > 0 else None
    if rotary_dim > head_dim:
        raise UnsupportedModel(f"rotary_ndims {rotary_dim} exceeds head_dim {head_dim}")

    spec_layers = []
    for layer in layers:
        a, mlp = layer.attention, layer.mlp
        spec_layers.append(Layer(
            attn_norm=norm_of(layer.input_layernorm, "layer"),
            q=None, k=None, v=None, qkv=linear_of(a.query_key_value), o=linear_of(a.dense),
            mlp_norm=norm_of(layer.post_attention_layernorm, "layer"),
            gate=None, up=linear_of(mlp.dense_h_to_4h), down=linear_of(mlp.dense_4h_to_h),
        ))
    embedding = base.embed_in.weight
    lm_head, tied = head_of(model, embedding)
    return ModelSpec(
        family="gpt_neox", hidden_size=hidden, num_layers=len(spec_layers),
        num_heads=num_heads, num_kv_heads=num_heads, head_dim=head_dim, vocab_size=embedding.shape[0],
        norm_kind="layer", activation=act, qkv_layout="per_head", parallel_residual=parallel,
        attn_scale=scale, rotary=rotary, position_embedding=None, max_positions=None,
        embedding=embedding, final_norm=norm_of(base.final_layer_norm, "layer"), lm_head=lm_head,
        tied_head=tied, layers=tuple(spec_layers),
    )
