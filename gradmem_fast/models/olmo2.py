"""OLMo 2 adapter: the Llama layout with post-norm blocks (a norm on each sublayer's output, before the
residual add, none on its input) and RMS norms of q and k over the whole projections, before rotary."""
from .llama import llama_like
from .spec import ModelSpec, linear_of, norm_of


def _post_norm_parts(layer):
    a, mlp = layer.self_attn, layer.mlp
    return dict(attn_norm=None,
                q=linear_of(a.q_proj), k=linear_of(a.k_proj), v=linear_of(a.v_proj), qkv=None, o=linear_of(a.o_proj),
                mlp_norm=None, gate=linear_of(mlp.gate_proj), up=linear_of(mlp.up_proj),
                down=linear_of(mlp.down_proj), post_attn_norm=norm_of(layer.post_attention_layernorm, "rms"),
                post_mlp_norm=norm_of(layer.post_feedforward_layernorm, "rms"))


def describe(model) -> ModelSpec:
    return llama_like(model, "olmo2", _post_norm_parts)
