"""`python -m gradmem_fast demo`: a write on a small seeded Llama (the paper's KV-retrieval shape).

Prints the per-step reconstruction loss of the reference writer, then the fast writer's agreement
with it and the two wall times. Runs on the CPU (or on CUDA with --device cuda). On the CPU the
fast engine runs the PyTorch twins of its kernels (no Triton, no CUDA graphs): its time there says
nothing about GPU speed, and backend="auto" takes the reference on the CPU.
"""
import argparse
import sys
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


def _device(name):
    """(torch.device, None), or (None, why the device cannot be used)."""
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        return None, f"--device {name!r} is not a device ({exc})"
    if device.type == "cuda" and not torch.cuda.is_available():
        return None, f"--device {name} needs a CUDA GPU, but torch finds none (torch.cuda.is_available() is False)"
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        return None, f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) are visible"
    if device.type not in ("cpu", "cuda"):
        return None, f"--device {name}: the demo runs on cpu or cuda"
    return device, None


def where_it_runs(device):
    """One plain sentence on what the fast writer runs on this device."""
    from ._triton import interpreter_on

    if device.type == "cuda":
        return ("fast writer on CUDA: Triton and CUDA kernels, the K steps replayed as a CUDA graph "
                "(the first call includes compiling and capturing)")
    if interpreter_on():
        return ("fast writer on the CPU with TRITON_INTERPRET=1: the Triton kernels run under the interpreter "
                "(a correctness check, far slower than either writer should be); backend='auto' takes the "
                "reference on the CPU")
    return ("fast writer on the CPU: the engine runs the PyTorch twins of its kernels (no Triton, no CUDA "
            "graphs); this checks its algorithm against the reference, its time is not GPU speed, and "
            "backend='auto' takes the reference on the CPU")


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

    device, problem = _device(args.device)
    if problem:
        print(f"python -m gradmem_fast demo: error: {problem}", file=sys.stderr)
        return 2
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
    print(f"reference writer (plain PyTorch autograd): {ref_ms:.1f} ms")
    print(where_it_runs(device))
    print("backend='auto' here: " + str(gradmem_fast.explain(model, memory, ids, mask)))
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
