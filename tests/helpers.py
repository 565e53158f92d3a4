"""Shared test helpers: tiny Hugging Face models built in code, poisoning, error measures."""
import math

import torch

FAMILIES = ("llama", "mistral", "qwen2", "gpt2", "gpt_neox", "qwen3", "olmo2", "phi3", "gemma3_text")


def tiny_config(family, **overrides):
    import transformers as tf

    if family in ("llama", "mistral", "qwen2"):
        cls = {"llama": tf.LlamaConfig, "mistral": tf.MistralConfig, "qwen2": tf.Qwen2Config}[family]
        kw = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=61, max_position_embeddings=256, rms_norm_eps=1e-5,
                  tie_word_embeddings=False)
        if family == "llama":
            kw["attention_bias"] = False
    elif family in ("qwen3", "olmo2", "phi3"):
        cls = {"qwen3": tf.Qwen3Config, "olmo2": tf.Olmo2Config, "phi3": tf.Phi3Config}[family]
        kw = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=61, max_position_embeddings=256, rms_norm_eps=1e-5,
                  tie_word_embeddings=False, pad_token_id=0, bos_token_id=0, eos_token_id=0)
        if family == "qwen3":
            kw["head_dim"] = 8
        if family == "phi3":
            kw.update(resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0, sliding_window=None)
    elif family == "gemma3_text":
        cls = tf.Gemma3TextConfig
        kw = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8, vocab_size=61, max_position_embeddings=256, rms_norm_eps=1e-5,
                  query_pre_attn_scalar=12, sliding_window=128, tie_word_embeddings=False, pad_token_id=0, bos_token_id=0, eos_token_id=0, attention_dropout=0.0)
    elif family == "gpt2":
        cls = tf.GPT2Config
        kw = dict(n_embd=32, n_layer=2, n_head=4, vocab_size=61, n_positions=128, resid_pdrop=0.0,
                  bos_token_id=0, eos_token_id=0,
                  embd_pdrop=0.0, attn_pdrop=0.0)
    elif family == "gpt_neox":
        cls = tf.GPTNeoXConfig
        kw = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  vocab_size=61, max_position_embeddings=256, rotary_pct=0.5, use_parallel_residual=True,
                  hidden_dropout=0.0, attention_dropout=0.0, tie_word_embeddings=False)
    else:
        raise ValueError(family)
    kw.update(overrides)
    if family == "gemma3_text" and "layer_types" not in overrides:  # local and global layers in turn
        kw["layer_types"] = [("sliding_attention", "full_attention")[i % 2] for i in range(kw["num_hidden_layers"])]
    return cls(**kw)


def tiny_model(family="llama", dtype=torch.float64, seed=0, attn="eager", **overrides):
    """A randomly initialised tiny causal LM of the given family, in eval mode, weights frozen."""
    import transformers as tf

    torch.manual_seed(seed)
    config = tiny_config(family, **overrides)
    config._attn_implementation = attn
    model = tf.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for p in model.parameters():  # larger than the default init so gradients are not tiny
            if p.dim() > 1:
                p.normal_(0.0, 0.2)
            else:
                p.add_(0.1 * torch.randn_like(p))
    model = model.to(dtype).eval()
    model.requires_grad_(False)
    return model


def random_batch(model, B, T, lengths=None, seed=0, m=4, device="cpu"):
    """ids (B, T), mask (B, T) right padded to `lengths`, and a memory (m, d) of N(0, 0.5^2)."""
    g = torch.Generator().manual_seed(seed)
    V = model.config.vocab_size
    d = model.config.hidden_size
    ids = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    if lengths is not None:
        for b, L in enumerate(lengths):
            mask[b, L:] = 0
    dtype = next(model.parameters()).dtype
    memory = (0.5 * torch.randn(m, d, generator=g, dtype=torch.float64)).to(dtype)
    return ids.to(device), mask.to(device), memory.to(device)


def poison_(t):
    """Fill a preallocated output with NaN so an unwritten element fails the comparison."""
    if t.is_floating_point():
        t.fill_(math.nan)
    return t


def rel_err(x, ref):
    """max |x - ref| / max |ref|, computed in float64; NaN anywhere gives inf."""
    x = x.double()
    ref = ref.double()
    if not torch.isfinite(x).all():
        return math.inf
    denom = ref.abs().max().clamp_min(1e-30)
    return ((x - ref).abs().max() / denom).item()


def saved_during(fn):
    """(fn(), the tensors autograd saved while it ran, in order)."""
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = fn()
    return out, saved


def assert_accuracy(got, want, dtype, rtol, ratio, plain):
    """Each result in `dtype` and like its float64 counterpart in `want`: relative error under rtol (fp32),
    or, for half precision (rtol None), within `ratio` x the error of `plain()`, the unfused computation
    in that dtype (called only then)."""
    baseline = plain() if rtol is None else (None,) * len(want)
    for a, b, p in zip(got, want, baseline):
        assert a.dtype == dtype and a.shape == b.shape
        if rtol is not None:
            assert rel_err(a, b) < rtol
        else:
            assert rel_err(a, b) <= ratio * rel_err(p, b), (rel_err(a, b), rel_err(p, b))
