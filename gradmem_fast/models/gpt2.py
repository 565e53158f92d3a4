"""GPT-2 adapter: LayerNorm, learned positions, fused c_attn (Conv1D, "concat" layout), GELU-tanh."""
from .spec import (ACTIVATIONS, Layer, ModelSpec, UnsupportedModel, check_loaded, head_of, linear_of,
                   norm_of, uniform)


def describe(model) -> ModelSpec:
    cfg = model.config
    check_loaded(model)
    base = getattr(model, "transformer", None)
    if base is None or not hasattr(base, "h") or not hasattr(base, "wpe"):
        raise UnsupportedModel(f"{type(model).__name__} does not have the GPT-2 module layout "
                               "(transformer.h, transformer.wpe)")
    if getattr(cfg, "add_cross_attention", False):
        raise UnsupportedModel("GPT-2 with cross-attention (add_cross_attention=True) is not supported")
    act = ACTIVATIONS.get(getattr(cfg, "activation_function", None))
    if act not in ("gelu_tanh", "gelu"):
        raise UnsupportedModel(f"activation_function '{cfg.activation_function}' is not supported for gpt2 "
                               "(supported: gelu_new, gelu_pytorch_tanh, gelu)")
    blocks = list(base.h)
    attn0 = blocks[0].attn
    num_heads, head_dim = attn0.num_heads, attn0.head_dim
    if getattr(cfg, "scale_attn_by_inverse_layer_idx", False) and len(blocks) > 1:
        raise UnsupportedModel("scale_attn_by_inverse_layer_idx=True gives each layer its own attention "
                               "scale; the spec holds one")
    scale = float(uniform((block.attn.scaling for block in blocks), "attention scaling"))

    layers = []
    for block in blocks:
        layers.append(Layer(
            attn_norm=norm_of(block.ln_1, "layer"),
            q=None, k=None, v=None, qkv=linear_of(block.attn.c_attn), o=linear_of(block.attn.c_proj),
            mlp_norm=norm_of(block.ln_2, "layer"),
            gate=None, up=linear_of(block.mlp.c_fc), down=linear_of(block.mlp.c_proj),
        ))
    embedding = base.wte.weight
    lm_head, tied = head_of(model, embedding)
    wpe = base.wpe.weight
    return ModelSpec(
        family="gpt2", hidden_size=embedding.shape[1], num_layers=len(layers),
        num_heads=num_heads, num_kv_heads=num_heads, head_dim=head_dim, vocab_size=embedding.shape[0],
        norm_kind="layer", activation=act, qkv_layout="concat", parallel_residual=False,
        attn_scale=scale, rotary=None, position_embedding=wpe, max_positions=wpe.shape[0],
        embedding=embedding, final_norm=norm_of(base.ln_f, "layer"), lm_head=lm_head, tied_head=tied,
        layers=tuple(layers),
    )
