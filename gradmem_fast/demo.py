"""`python -m gradmem_fast demo`: a write on a small seeded Llama (the paper's KV-retrieval shape).

Prints the per-step reconstruction loss of the reference writer, then the fast writer's agreement
with it and the two wall times. Runs on the CPU (or on CUDA with --device cuda).
"""
import argparse
import time

import torch


def demo_model(device, dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=4, vocab_size=70, max_position_embeddings=1024,
                         tie_word_embeddings=False)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(device=device, dtype=dtype).eval()
    model.requires_grad_(False)
    return model


def _timed(fn):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, (time.perf_counter() - start) * 1e3


def main(argv=None):
    import gradmem_fast

    parser = argparse.ArgumentParser(prog="python -m gradmem_fast demo", description=__doc__)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=57, help="context length T")
    parser.add_argument("--memory", type=int, default=8, help="memory rows m")
    parser.add_argument("--steps", type=int, default=5, help="write steps K")
    parser.add_argument("--lr", type=float, default=2.0)
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    model = demo_model(device, torch.float32)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 70, (args.batch, args.tokens), generator=g).to(device)
    mask = torch.ones_like(ids)
    mask[1:, args.tokens * 2 // 3 :] = 0  # later samples are shorter (right padding)
    memory = (0.02 * torch.randn(args.memory, 128, generator=g)).to(device)

    print(f"model: Llama, 4 layers, d 128, vocab 70, fp32 on {device}; B {args.batch}, T {args.tokens}, "
          f"m {args.memory}, K {args.steps}, lr {args.lr}")
    (ref, ref_losses), ref_ms = _timed(lambda: gradmem_fast.write(
        model, memory, ids, mask, steps=args.steps, lr=args.lr, backend="reference", return_losses=True))
    for k in range(args.steps):
        print(f"step {k}: reconstruction loss per sample " + " ".join(f"{x:.4f}" for x in ref_losses[:, k].tolist()))
    after = gradmem_fast.write(model, ref, ids, mask, steps=1, lr=0.0, backend="reference", return_losses=True)[1]
    print("after the write:                   " + " ".join(f"{x:.4f}" for x in after[:, 0].tolist()))
    print(f"reference writer: {ref_ms:.1f} ms")
    try:
        (fast, fast_losses), fast_ms = _timed(lambda: gradmem_fast.write(
            model, memory, ids, mask, steps=args.steps, lr=args.lr, backend="fast", return_losses=True))
    except (gradmem_fast.BackendUnavailable, NotImplementedError) as exc:
        print(f"fast writer: unavailable ({exc})")
        return 0
    err = ((fast - ref).abs().max() / ref.abs().max()).item()
    loss_err = ((fast_losses - ref_losses).abs().max() / ref_losses.abs().max()).item()
    print(f"fast writer: {fast_ms:.1f} ms (first call, includes one-time setup); "
          f"relative error vs reference: memory {err:.2e}, losses {loss_err:.2e}")
    _, fast_ms2 = _timed(lambda: gradmem_fast.write(model, memory, ids, mask, steps=args.steps, lr=args.lr,
                                                    backend="fast"))
    print(f"fast writer, second call: {fast_ms2:.1f} ms")
    return 0
