"""The standard write cases of the performance guide, and models with random weights built for them.

Configurations are built in code (no downloads). Weights are drawn by the model's own initialiser
with a fixed seed, directly on the target device, so a 1B-parameter model builds in seconds.
"""
from dataclasses import dataclass, replace

import torch

STEPS = 5
LR = 1.0
MEMORY_INIT_STD = 0.02  # N(0, 0.02^2) initial memory, as a learned M0 starts


def gpt2_small_config():
    import transformers as tf

    return tf.GPT2Config(n_embd=768, n_layer=12, n_head=12, vocab_size=50257, n_positions=1024,
                         resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)


def llama1b_config():
    import transformers as tf

    return tf.LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                          num_attention_heads=32, num_key_value_heads=8, head_dim=64, vocab_size=128256,
                          tie_word_embeddings=True, max_position_embeddings=131072, rms_norm_eps=1e-5,
                          rope_theta=500000.0, attention_bias=False, mlp_bias=False)


def kv_config():
    import transformers as tf

    return tf.LlamaConfig(hidden_size=128, intermediate_size=512, num_hidden_layers=4,
                          num_attention_heads=4, num_key_value_heads=4, head_dim=32, vocab_size=70,
                          tie_word_embeddings=False, max_position_embeddings=2048, rms_norm_eps=1e-5,
                          attention_bias=False, mlp_bias=False)


CONFIGS = {"gpt2-small": gpt2_small_config, "llama1b": llama1b_config, "kv": kv_config}


@dataclass(frozen=True)
class Case:
    name: str
    config: str  # key of CONFIGS
    B: int
    T: int
    m: int
    dtype: str  # "bf16" or "fp32"
    K: int = STEPS
    latency: bool = False  # a B = 1 case, where launch overhead dominates

    @property
    def torch_dtype(self):
        return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[self.dtype]

    def resized(self, B=None, T=None):
        """The same case at another batch or context length (CPU smoke runs)."""
        return replace(self, B=self.B if B is None else B, T=self.T if T is None else T)


CASES = (
    Case("gpt2-latency", "gpt2-small", 1, 512, 16, "bf16", latency=True),
    Case("gpt2-batch", "gpt2-small", 16, 1008, 16, "bf16"),
    Case("llama1b-latency", "llama1b", 1, 1024, 16, "bf16", latency=True),
    Case("llama1b-batch", "llama1b", 8, 2048, 16, "bf16"),
    Case("kv-paper", "kv", 64, 897, 8, "fp32"),
    Case("kv-latency", "kv", 1, 897, 8, "fp32", latency=True),
)
CASE_NAMES = tuple(c.name for c in CASES)
SMALLEST = "kv-latency"


def get_case(name):
    for case in CASES:
        if case.name == name:
            return case
    raise ValueError(f"unknown case {name!r}; known: {', '.join(CASE_NAMES)}")


def build_config(case, attn="sdpa"):
    config = CONFIGS[case.config]()
    config._attn_implementation = attn
    return config


def build_model(case, device, seed=0, attn="sdpa"):
    """The case's model with random weights, in eval mode, frozen, in the case's dtype on `device`."""
    import transformers as tf

    config = build_config(case, attn)
    torch.manual_seed(seed)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(case.torch_dtype)
    try:
        with torch.device(device):
            model = tf.AutoModelForCausalLM.from_config(config)
    finally:
        torch.set_default_dtype(default_dtype)
    model = model.to(device=device, dtype=case.torch_dtype).eval()
    model.requires_grad_(False)
    return model


def make_inputs(case, device, seed=0):
    """Random context ids (B, T) and the initial memory (m, d) in the case's dtype."""
    config = CONFIGS[case.config]()
    g = torch.Generator(device="cpu").manual_seed(seed)
    ids = torch.randint(0, config.vocab_size, (case.B, case.T), generator=g)
    memory = MEMORY_INIT_STD * torch.randn(case.m, config.hidden_size, generator=g)
    return ids.to(device), memory.to(device=device, dtype=case.torch_dtype)
