"""describe(): spec fields, views of the model's own parameters, and reasons for what it refuses."""
import pytest
import torch

from gradmem_fast.models import UnsupportedModel, describe, model_reason
from helpers import FAMILIES, tiny_model


def _spec_tensors(spec):
    yield "embedding", spec.embedding
    if spec.position_embedding is not None:
        yield "position_embedding", spec.position_embedding
    if spec.rotary is not None:
        yield "rotary.inv_freq", spec.rotary.inv_freq
    yield "final_norm.weight", spec.final_norm.weight
    yield "final_norm.bias", spec.final_norm.bias
    yield "lm_head", spec.lm_head.weight
    for i, layer in enumerate(spec.layers):
        for name in ("attn_norm", "mlp_norm", "post_attn_norm", "post_mlp_norm", "q_norm", "k_norm"):
            n = getattr(layer, name)
            if n is None:
                continue
            yield f"{i}.{name}.weight", n.weight
            yield f"{i}.{name}.bias", n.bias
        for name in ("q", "k", "v", "qkv", "o", "gate", "up", "down"):
            lin = getattr(layer, name)
            if lin is not None:
                yield f"{i}.{name}.weight", lin.weight
                yield f"{i}.{name}.bias", lin.bias


def _within(t, p):
    base = p.untyped_storage().data_ptr()
    end = base + p.untyped_storage().nbytes()
    return t.untyped_storage().data_ptr() == base and base <= t.data_ptr() < end


@pytest.mark.parametrize("family", FAMILIES)
def test_spec_tensors_are_views_of_parameters(family):
    model = tiny_model(family)
    spec = describe(model)
    owners = list(model.parameters()) + list(model.buffers())
    for name, t in _spec_tensors(spec):
        if t is None:
            continue
        assert any(_within(t, p) for p in owners), f"{family}: {name} is not a view of a model tensor"


@pytest.mark.parametrize("family,layout,heads,kv_heads,norm,act,rotary_dim,positions", [
    ("llama", "separate", 4, 2, "rms", "swiglu", 8, None),
    ("mistral", "separate", 4, 2, "rms", "swiglu", 8, 4096),
    ("qwen2", "separate", 4, 2, "rms", "swiglu", 8, None),
    ("gpt2", "concat", 4, 4, "layer", "gelu_tanh", None, 128),
    ("gpt_neox", "per_head", 4, 4, "layer", "gelu", 4, None),
    ("qwen3", "separate", 4, 2, "rms", "swiglu", 8, None),
    ("olmo2", "separate", 4, 2, "rms", "swiglu", 8, None),
    ("phi3", "concat", 4, 2, "rms", "swiglu", 8, None),
    ("gemma3_text", "separate", 4, 2, "rms", "geglu_tanh", 8, 128),
])
def test_spec_fields(family, layout, heads, kv_heads, norm, act, rotary_dim, positions):
    model = tiny_model(family)
    spec = describe(model)
    assert (spec.qkv_layout, spec.num_heads, spec.num_kv_heads, spec.head_dim) == (layout, heads, kv_heads, 8)
    assert (spec.norm_kind, spec.activation, spec.max_positions) == (norm, act, positions)
    assert (spec.rotary.rotary_dim if spec.rotary else None) == rotary_dim
    assert (spec.hidden_size, spec.vocab_size, spec.num_layers, len(spec.layers)) == (32, 61, 2, 2)
    assert spec.attn_scale == pytest.approx((12 if family == "gemma3_text" else 8) ** -0.5, rel=1e-15)
    assert spec.parallel_residual == (family == "gpt_neox")
    assert spec.block == {"gpt_neox": "parallel", "olmo2": "post", "gemma3_text": "sandwich"}.get(family, "pre")
    assert spec.qk_norm == {"qwen3": "head", "olmo2": "full", "gemma3_text": "head"}.get(family)
    assert spec.lm_head.bias is None
    assert model_reason(model) is None


def test_qwen2_has_qkv_bias_and_gpt2_conv_weights_are_transposed_views():
    spec = describe(tiny_model("qwen2"))
    assert all(getattr(spec.layers[0], n).bias is not None for n in "qkv") and spec.layers[0].o.bias is None
    model = tiny_model("gpt2")
    spec = describe(model)
    c_attn = model.transformer.h[0].attn.c_attn.weight
    assert spec.layers[0].qkv.weight.shape == (96, 32)
    assert torch.equal(spec.layers[0].qkv.weight, c_attn.t())


@pytest.mark.parametrize("family,over,tied", [
    ("llama", {}, False), ("llama", {"tie_word_embeddings": True}, True), ("gpt2", {}, True),
    ("gpt2", {"tie_word_embeddings": False}, False), ("gpt_neox", {}, False),
    ("gpt_neox", {"tie_word_embeddings": True}, True),
])
def test_tied_head(family, over, tied):
    spec = describe(tiny_model(family, **over))
    assert spec.tied_head == tied
    assert (spec.lm_head.weight.data_ptr() == spec.embedding.data_ptr()) == tied


def _bert():
    import transformers as tf

    cfg = tf.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=48,
                        vocab_size=61, is_decoder=True)
    return tf.BertLMHeadModel(cfg).eval()


def _head_with_bias():
    model = tiny_model("llama")
    model.lm_head = torch.nn.Linear(32, 61, bias=True, dtype=torch.float64)
    return model


def _base_model():
    return tiny_model("llama").model


REFUSED = [
    ("bert", _bert, "model type 'bert' is not supported"),
    ("not hf", lambda: torch.nn.Linear(4, 4), "not a Hugging Face model"),
    ("base model", _base_model, "does not have the Llama module layout"),
    ("head bias", _head_with_bias, "LM head with bias"),
    ("gpt2 inverse layer idx", lambda: tiny_model("gpt2", scale_attn_by_inverse_layer_idx=True),
     "scale_attn_by_inverse_layer_idx"),
    ("gpt2 cross attention", lambda: tiny_model("gpt2", add_cross_attention=True), "cross-attention"),
    ("gpt2 relu", lambda: tiny_model("gpt2", activation_function="relu"), "activation_function 'relu'"),
    ("llama gelu", lambda: tiny_model("llama", hidden_act="gelu"), "hidden_act 'gelu'"),
    ("neox relu", lambda: tiny_model("gpt_neox", hidden_act="relu"), "hidden_act 'relu'"),
    ("dynamic rope", lambda: tiny_model("llama", rope_parameters={"rope_type": "dynamic", "factor": 2.0,
                                                                  "rope_theta": 10000.0}),
     "rope type 'dynamic'"),
    ("longrope", lambda: tiny_model("llama", rope_parameters={
        "rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0] * 4, "long_factor": [2.0] * 4,
        "original_max_position_embeddings": 64}), "rope type 'longrope'"),
]


@pytest.mark.parametrize("name,make,match", REFUSED, ids=[r[0] for r in REFUSED])
def test_refused_with_reason(name, make, match):
    model = make()
    reason = model_reason(model)
    assert reason is not None and match in reason, reason
    with pytest.raises(UnsupportedModel, match=match):
        describe(model)
    assert issubclass(UnsupportedModel, ValueError)


def test_phi3_fused_projections_are_views():
    model = tiny_model("phi3", rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                "partial_rotary_factor": 0.5})
    spec = describe(model)
    mlp = model.model.layers[0].mlp.gate_up_proj.weight
    assert torch.equal(spec.layers[0].gate.weight, mlp[:48]) and torch.equal(spec.layers[0].up.weight, mlp[48:])
    assert spec.layers[0].qkv.weight is model.model.layers[0].self_attn.qkv_proj.weight
    assert spec.rotary.rotary_dim == 4


def test_qk_norm_shapes():
    qwen3, olmo2 = describe(tiny_model("qwen3")), describe(tiny_model("olmo2"))
    assert qwen3.layers[0].q_norm.weight.shape == qwen3.layers[0].k_norm.weight.shape == (8,)
    assert (olmo2.layers[0].q_norm.weight.shape, olmo2.layers[0].k_norm.weight.shape) == ((32,), (16,))
    assert olmo2.layers[0].attn_norm is None and olmo2.layers[0].post_mlp_norm is not None


def test_gemma3_local_layers_have_their_own_rotary_and_norms_scale_by_one_plus_w():
    model = tiny_model("gemma3_text")
    spec = describe(model)
    local, global_ = spec.layers
    assert local.rotary is not None and global_.rotary is None
    assert local.rotary.inv_freq is model.model.rotary_emb.sliding_attention_inv_freq
    assert spec.rotary.inv_freq is model.model.rotary_emb.full_attention_inv_freq
    assert all(n.offset == 1.0 for n in (local.attn_norm, local.post_mlp_norm, local.q_norm, spec.final_norm))
    assert spec.embedding_scale == pytest.approx(32 ** 0.5, rel=1e-7)


def test_gpt2_single_layer_inverse_layer_idx_is_expressible():
    spec = describe(tiny_model("gpt2", scale_attn_by_inverse_layer_idx=True, n_layer=1))
    assert spec.attn_scale == pytest.approx(8 ** -0.5, rel=1e-15)


def test_meta_weights_refused():
    import transformers as tf
    from helpers import tiny_config

    with torch.device("meta"):
        model = tf.AutoModelForCausalLM.from_config(tiny_config("llama"))
    assert "meta device" in model_reason(model)
