"""Phi-3 adapter: the Llama layout with a fused qkv_proj (rows [q | k | v], the "concat" layout), a fused
gate_up_proj (rows [gate | up]: seen as two views), partial rotary, sliding window as for Mistral."""
from .llama import llama_like
from .spec import Linear, ModelSpec, UnsupportedModel, linear_of, norm_of


def _halves(lin: Linear):
    """[gate | up] rows of the fused projection as two Linears (views)."""
    rows = lin.weight.shape[0]
    if rows % 2:
        raise UnsupportedModel(f"gate_up_proj with {rows} outputs does not split into gate and up")
    half = rows // 2
    bias = (None, None) if lin.bias is None else (lin.bias[:half], lin.bias[half:])
    return Linear(lin.weight[:half], bias[0]), Linear(lin.weight[half:], bias[1])


def _parts(layer):
    a, mlp = layer.self_attn, layer.mlp
    gate, up = _halves(linear_of(mlp.gate_up_proj))
    return dict(attn_norm=norm_of(layer.input_layernorm, "rms"), q=None, k=None, v=None,
                qkv=linear_of(a.qkv_proj), o=linear_of(a.o_proj),
                mlp_norm=norm_of(layer.post_attention_layernorm, "rms"),
                gate=gate, up=up, down=linear_of(mlp.down_proj))


def describe(model) -> ModelSpec:
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    rope = getattr(cfg, "rope_parameters", None) or {}
    factor = rope.get("partial_rotary_factor", getattr(cfg, "partial_rotary_factor", 1.0)) or 1.0
    return llama_like(model, "phi3", _parts, rotary_dim=int(head_dim * factor),
                      max_positions=getattr(cfg, "sliding_window", None))
