"""The FLOP floor of a write and the bf16 matrix-multiply rate it is measured against.

    F_step = 4 * N * P + 3.5 * A,   N = B * (m + T),   A = 2 * B * (m + T)^2 * d * L
    floor  = K * F_step / R

P counts the matrix parameters (every linear layer plus the LM head, counted even when tied);
R is the rate of an 8192^3 bf16 product measured in the same run.
"""
import torch


def matrix_params(config):
    """P: weights of all linear layers and the LM head of a GPT-2 or Llama-family config."""
    if config.model_type == "gpt2":
        d, L, V = config.n_embd, config.n_layer, config.vocab_size
        ffn = config.n_inner or 4 * d
        per_layer = d * 3 * d + d * d + 2 * d * ffn
    elif config.model_type in ("llama", "mistral", "qwen2"):
        d, L, V = config.hidden_size, config.num_hidden_layers, config.vocab_size
        head_dim = getattr(config, "head_dim", None) or d // config.num_attention_heads
        q = config.num_attention_heads * head_dim
        kv = config.num_key_value_heads * head_dim
        per_layer = d * q + 2 * d * kv + q * d + 3 * d * config.intermediate_size
    else:
        raise ValueError(f"config.model_type {config.model_type!r} is not supported")
    return L * per_layer + V * d


def model_dims(config):
    """(d, L) of a config: hidden size and layer count."""
    if config.model_type == "gpt2":
        return config.n_embd, config.n_layer
    return config.hidden_size, config.num_hidden_layers


def step_flops(config, B, T, m):
    """F_step of one write step: forward, input-gradient backward and causal attention."""
    d, L = model_dims(config)
    n_tokens = B * (m + T)
    attention = 2 * B * (m + T) ** 2 * d * L
    return 4 * n_tokens * matrix_params(config) + 3.5 * attention


def floor_ms(config, B, T, m, K, matmul_tflops):
    """K * F_step / R in milliseconds; None when the rate was not measured."""
    if matmul_tflops is None:
        return None
    return K * step_flops(config, B, T, m) / (matmul_tflops * 1e12) * 1e3


def measure_matmul_tflops(device="cuda", n=8192, dtype=torch.bfloat16, warmup=3, repeats=10):
    """Rate of an n^3 product (2 n^3 FLOP) on a CUDA device, median over CUDA-event timings."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    for _ in range(warmup):
        torch.mm(a, b, out=out)
    times = []
    for _ in range(repeats):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        torch.mm(a, b, out=out)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    ms = times[len(times) // 2]
    return 2 * n ** 3 / (ms * 1e-3) / 1e12
