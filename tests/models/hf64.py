"""Run a Hugging Face model entirely in float64 and record what its attention sees.

HF computes RMSNorm, rotary angles and the attention softmax in float32 even for a float64 model;
for a 1e-10 comparison those casts are lifted (the math is unchanged): RMSNorm and rotary
instances get float64-preserving forwards, and softmax keeps float64 inputs in float64.
"""
import contextlib
import sys
import types

import torch

ATTENTION_MODULE = {"llama": "self_attn", "mistral": "self_attn", "qwen2": "self_attn", "gpt2": "attn",
                    "gpt_neox": "attention", "qwen3": "self_attn", "olmo2": "self_attn", "phi3": "self_attn",
                    "gemma3_text": "self_attn"}


def _rms_forward(self, x):
    var = x.pow(2).mean(-1, keepdim=True)
    return self.weight * (x * torch.rsqrt(var + self.variance_epsilon))


def _gemma_rms_forward(self, x):  # Gemma scales by (1 + w)
    var = x.pow(2).mean(-1, keepdim=True)
    return (1.0 + self.weight) * (x * torch.rsqrt(var + self.eps))


def _rotary_forward(self, x, position_ids, layer_type=None):
    prefix = "" if layer_type is None else f"{layer_type}_"  # Gemma 3: one inv_freq per layer type
    inv_freq, scaling = getattr(self, prefix + "inv_freq"), getattr(self, prefix + "attention_scaling")
    freqs = position_ids[..., None].to(torch.float64) * inv_freq.to(device=x.device, dtype=torch.float64)
    emb = torch.cat((freqs, freqs), dim=-1)
    return (emb.cos() * scaling).to(x.dtype), (emb.sin() * scaling).to(x.dtype)


def _decoder_layers(model):
    mt = model.config.model_type
    if mt == "gpt2":
        return list(model.transformer.h)
    if mt == "gpt_neox":
        return list(model.gpt_neox.layers)
    return list(model.model.layers)


@contextlib.contextmanager
def hf_float64(model, record=None):
    """Within the block, model(...) computes in float64 throughout. With `record` (a dict), fills
    record["x"][i] = input of layer i's attention (normed hidden, (B, S, d)) and record["qkv"][i] =
    (q, k, v) as HF's eager attention receives them ((B, H, S, hd), rotary applied, kv not repeated)."""
    patched = []
    for module in model.modules():
        name = type(module).__name__
        if name.endswith("RMSNorm"):
            forward = _gemma_rms_forward if name.startswith("Gemma") else _rms_forward
            module.forward = types.MethodType(forward, module)
            patched.append(module)
        elif name.endswith("RotaryEmbedding"):
            module.forward = types.MethodType(_rotary_forward, module)
            patched.append(module)
    softmax = torch.nn.functional.softmax

    def softmax64(input, dim=None, _stacklevel=3, dtype=None):
        if input.dtype == torch.float64:
            dtype = None
        return softmax(input, dim=dim, _stacklevel=_stacklevel, dtype=dtype)

    modeling = sys.modules[type(model).__module__]
    eager = modeling.eager_attention_forward
    hooks = []
    if record is not None:
        record["x"], record["qkv"] = {}, {}
        for i, layer in enumerate(_decoder_layers(model)):
            attn = getattr(layer, ATTENTION_MODULE[model.config.model_type])
            attn._record_index = i

            def pre_hook(mod, args, kwargs):
                record["x"][mod._record_index] = args[0] if args else kwargs["hidden_states"]

            hooks.append(attn.register_forward_pre_hook(pre_hook, with_kwargs=True))

    def eager_recording(module, query, key, value, *args, **kwargs):
        if record is not None:
            record["qkv"][module._record_index] = (query, key, value)
        return eager(module, query, key, value, *args, **kwargs)

    torch.nn.functional.softmax = softmax64
    modeling.eager_attention_forward = eager_recording
    try:
        yield model
    finally:
        torch.nn.functional.softmax = softmax
        modeling.eager_attention_forward = eager
        for h in hooks:
            h.remove()
        for module in patched:
            del module.forward
