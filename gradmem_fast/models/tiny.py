"""A Hugging Face model configuration shrunk to tiny widths, for counting launches and for tests on the CPU.

Launch counts depend on the layer count, the family, B == 1 vs B > 1 and the options, not on widths or
values, so the tiny model of a configuration issues the launches of the real one.
"""
import torch

TINY = {  # widths only, per configuration name: the layer count, family, head grouping and tying stay
    "gpt2-small": dict(n_embd=64, n_head=4, vocab_size=97, n_positions=256),
    "llama1b": dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=1,
                    head_dim=16, vocab_size=97, max_position_embeddings=256),
    "kv": dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=4, head_dim=16,
               max_position_embeddings=256),
}


def counting_dtype(dtype):
    """dtype itself, float16 for bfloat16 under the Triton interpreter (wrong bfloat16 arithmetic there;
    the ops issue the same launches for both 16-bit dtypes)."""
    from .._triton import interpreter_on

    return torch.float16 if dtype == torch.bfloat16 and interpreter_on() else dtype


def tiny_model(config, widths, dtype, seed=0):
    """The causal LM of `config` with `widths` (a TINY entry) set, random weights (seeded), in counting_dtype
    on the CPU, eval mode, frozen. config is changed in place."""
    import transformers as tf

    for key, value in widths.items():
        setattr(config, key, value)
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(config).to(counting_dtype(dtype)).eval()
    model.requires_grad_(False)
    return model
