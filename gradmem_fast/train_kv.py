"""`python -m gradmem_fast train-kv`: meta-train a writer on associative key-value retrieval.

Trains the paper's small Llama (4 layers, 4 heads, d 128, FFN 512) from scratch inside GradMemLM
with AdamW: each step writes a batch of contexts into memory (K steps, grad mode as asked) and
reads the answers from the memory alone. Evaluates exact match periodically, keeps a checkpoint
it can resume from, and writes metrics.json and a plot (training curve; exact match against the
number of write steps used at test time, 0 .. 4K, with the trained weights).
"""
import argparse
import json
import math
import os
import platform
import sys
import time

import torch

from .lm import GradMemLM
from .tasks import kv_retrieval as kv

CHECKPOINT_DIR = "checkpoint"
STATE_NAME = "train_state.pt"


def add_arguments(parser):
    add = parser.add_argument
    add("--pairs", type=int, default=2, help="key-value pairs per context (N)")
    add("--memory", type=int, default=8, help="memory rows (m)")
    add("--steps", type=int, default=2, help="write steps during training (K)")
    add("--inner-lr", type=float, default=0.1, help="write step size")
    add("--grad-mode", choices=("none", "first", "second"), default="second")
    add("--second-order-steps", type=int, default=None, help="only the last j write steps second order")
    add("--train-steps", type=int, default=2000, help="optimizer steps")
    add("--batch", type=int, default=64)
    add("--lr", type=float, default=1e-3, help="AdamW learning rate (linear warm-up, cosine decay to 10%%)")
    add("--warmup", type=int, default=100, help="warm-up steps")
    add("--weight-decay", type=float, default=0.01)
    add("--inner-loss-weight", type=float, default=0.0)
    add("--no-write-head", action="store_true", help="write with the LM head instead of a separate head")
    add("--no-memory-proj", action="store_true", help="no learned projection of the memory")
    add("--key-len", type=int, default=2)
    add("--value-len", type=int, default=2)
    add("--eval-every", type=int, default=200)
    add("--eval-samples", type=int, default=512)
    add("--checkpoint-every", type=int, default=200)
    add("--log-every", type=int, default=10)
    add("--backend", choices=("auto", "fast", "reference"), default="auto",
        help="write backend, as in gradmem_fast.write (auto: the fast engine wherever it can run)")
    add("--device", choices=("cpu", "cuda"), default="cpu")
    add("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    add("--seed", type=int, default=0)
    add("--out", required=True, help="output folder (metrics.json, the plot, the checkpoint)")
    add("--no-resume", action="store_true", help="start over even when OUT holds a checkpoint")
    return parser


def add_parser(subparsers):
    """Register `train-kv` on an argparse subparsers object; the parsed args go to run()."""
    parser = subparsers.add_parser("train-kv", help="meta-train a writer on key-value retrieval",
                                   description=__doc__.splitlines()[0])
    add_arguments(parser)
    parser.set_defaults(func=run)
    return parser


def build_model(args, device):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=len(kv.VOCAB), hidden_size=128, intermediate_size=512, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024,
                         tie_word_embeddings=False, pad_token_id=kv.PAD_ID, bos_token_id=1, eos_token_id=2,
                         attn_implementation="eager")
    torch.manual_seed(args.seed)
    lm = LlamaForCausalLM(config).to(device)
    return GradMemLM(lm, args.memory, steps=args.steps, lr=args.inner_lr, grad_mode=args.grad_mode,
                     second_order_steps=args.second_order_steps, write_head=not args.no_write_head,
                     memory_proj=not args.no_memory_proj, inner_loss_weight=args.inner_loss_weight,
                     backend=args.backend)


def schedule(args):
    def factor(step):
        if step < args.warmup:
            return (step + 1) / args.warmup
        progress = (step - args.warmup) / max(1, args.train_steps - args.warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return factor


def to_device(batch, device):
    return {k: v.to(device) for k, v in batch.items()}


def evaluate(module, dataset, device, steps, batch_size):
    """(exact match, mean answer loss) over the dataset with `steps` write steps, no outer graph."""
    saved_mode, was_training = module.grad_mode, module.training
    module.grad_mode = "none"  # same written memory, without building the second-order graph
    module.eval()
    hits, loss_sum, count = 0, 0.0, 0
    try:
        for start in range(0, len(dataset), batch_size):
            items = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
            batch = to_device(kv.collate(items), device)
            out = module(**batch, steps=steps)
            with torch.no_grad():
                hits += int(kv.exact_match(out.logits, batch["labels"], kv.value_mask(items).to(device)).sum())
                loss_sum += float(out.loss) * len(items)
            count += len(items)
    finally:
        module.grad_mode = saved_mode
        module.train(was_training)
    return hits / count, loss_sum / count


def save_checkpoint(out_dir, module, optimizer, scheduler, step, record):
    path = os.path.join(out_dir, CHECKPOINT_DIR)
    module.save_pretrained(path)
    state = {"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
             "record": record, "torch_rng": torch.get_rng_state()}
    torch.save(state, os.path.join(path, STATE_NAME + ".tmp"))
    os.replace(os.path.join(path, STATE_NAME + ".tmp"), os.path.join(path, STATE_NAME))


def load_checkpoint(out_dir, device):
    path = os.path.join(out_dir, CHECKPOINT_DIR)
    if not os.path.isfile(os.path.join(path, STATE_NAME)):
        return None
    module = GradMemLM.from_pretrained(path).to(device)
    state = torch.load(os.path.join(path, STATE_NAME), map_location=device, weights_only=False)
    return module, state


def plot(record, path):
    """Training curve and test-time step scaling; returns the path or None without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot written (pip install matplotlib)", file=sys.stderr)
        return None
    args = record["args"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    steps = [h["step"] for h in record["history"]]
    left.plot(steps, [h["loss"] for h in record["history"]], lw=0.8, label="answer loss (train)")
    left.plot(steps, [h["inner_loss_last"] for h in record["history"]], lw=0.8, label="last inner loss (train)")
    left.set_xlabel("optimizer step")
    left.set_ylabel("cross-entropy")
    left.set_yscale("log")
    em_axis = left.twinx()
    em_axis.plot([e["step"] for e in record["evals"]], [e["exact_match"] for e in record["evals"]], "k.-",
                 label=f"exact match (eval, K={args['steps']})")
    em_axis.set_ylim(0, 1)
    em_axis.set_ylabel("exact match")
    lines = left.get_legend_handles_labels()
    more = em_axis.get_legend_handles_labels()
    left.legend(lines[0] + more[0], lines[1] + more[1], fontsize=8, loc="center right")
    left.set_title(f"KV retrieval, N={args['pairs']}, m={args['memory']}, grad mode {args['grad_mode']}")
    scaling = record.get("step_scaling", [])
    right.plot([s["steps"] for s in scaling], [s["exact_match"] for s in scaling], "o-", label="trained weights")
    right.axvline(args["steps"], color="gray", ls="--", lw=0.8, label=f"K at training = {args['steps']}")
    if args["pairs"] > 1:
        right.axhline(record["chance"]["one_of_the_context_values"], color="orange", ls=":", lw=1,
                      label="1/N (a context value at random)")
    right.axhline(record["chance"]["uniform"], color="red", ls=":", lw=1, label="uniform guess (62^-len)")
    right.set_xlabel("write steps at test time")
    right.set_ylabel("exact match")
    right.set_ylim(-0.02, 1.02)
    right.legend(fontsize=8, loc="lower right")
    right.set_title("test-time step scaling")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def check_args(args):
    for name in ("pairs", "memory", "train_steps", "batch", "eval_every", "eval_samples", "checkpoint_every",
                 "log_every", "key_len", "value_len"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {args.steps}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda but torch sees no CUDA device")


def run(args):
    from tqdm import tqdm

    check_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    os.makedirs(args.out, exist_ok=True)
    train_set = kv.KVRetrievalDataset(args.pairs, args.train_steps * args.batch, key_len=args.key_len,
                                      value_len=args.value_len, seed=args.seed)
    eval_set = kv.KVRetrievalDataset(args.pairs, args.eval_samples, key_len=args.key_len,
                                     value_len=args.value_len, seed=args.seed + 1_000_003)
    resumed = None if args.no_resume else load_checkpoint(args.out, device)
    module = resumed[0] if resumed else build_model(args, device)
    module.backend = args.backend
    optimizer = torch.optim.AdamW(module.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule(args))
    if resumed:
        state = resumed[1]
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        start, record = state["step"], state["record"]
        print(f"resuming from step {start} in {args.out}", file=sys.stderr)
    else:
        start = 0
        record = {"args": vars(args).copy(), "history": [], "evals": [], "elapsed_s": 0.0,
                  "parameters": sum(p.numel() for p in module.parameters()),
                  "chance": {"uniform": kv.chance_exact_match(args.value_len),
                             "one_of_the_context_values": 1.0 / args.pairs},
                  "versions": {"torch": torch.__version__, "python": platform.python_version()}}
        record["args"].pop("func", None)
    module.train()
    began = time.time() - record["elapsed_s"]
    bar = tqdm(range(start, args.train_steps), initial=start, total=args.train_steps, mininterval=10,
               desc="train-kv", file=sys.stderr)
    for step in bar:
        items = [train_set[i] for i in range(step * args.batch, (step + 1) * args.batch)]
        out = module(**to_device(kv.collate(items), device))
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        done, loss = step + 1, float(out.loss.detach())
        if done % args.log_every == 0 or done == args.train_steps:
            inner = out.inner_losses.detach()
            record["history"].append({"step": done, "loss": loss, "lr": scheduler.get_last_lr()[0],
                                      "inner_loss_first": float(inner[:, 0].mean()),
                                      "inner_loss_last": float(inner[:, -1].mean()),
                                      "elapsed_s": time.time() - began})
            bar.set_postfix(loss=f"{loss:.3f}", inner=f"{float(inner[:, -1].mean()):.3f}")
        if done % args.eval_every == 0 or done == args.train_steps:
            em, loss = evaluate(module, eval_set, device, args.steps, args.batch)
            record["evals"].append({"step": done, "exact_match": em, "loss": loss})
            bar.write(f"step {done}: eval exact match {em:.3f}, answer loss {loss:.3f}", file=sys.stderr)
        if done % args.checkpoint_every == 0 or done == args.train_steps:
            record["elapsed_s"] = time.time() - began
            save_checkpoint(args.out, module, optimizer, scheduler, done, record)
    bar.close()
    record["train_elapsed_s"] = time.time() - began
    record["step_scaling"] = []
    for k in range(0, 4 * args.steps + 1):
        em, loss = evaluate(module, eval_set, device, k, args.batch)
        record["step_scaling"].append({"steps": k, "exact_match": em, "loss": loss})
        print(f"test-time write steps {k}: exact match {em:.3f}, answer loss {loss:.3f}", file=sys.stderr)
    record["elapsed_s"] = time.time() - began
    with open(os.path.join(args.out, "metrics.json"), "w") as f:
        json.dump(record, f, indent=1)
    plot(record, os.path.join(args.out, "kv_retrieval.png"))
    return 0


def main(argv=None):
    """Entry point: a list of command-line arguments (after `train-kv`) or parsed args."""
    if isinstance(argv, argparse.Namespace):
        return run(argv)
    parser = argparse.ArgumentParser(prog="python -m gradmem_fast train-kv", description=__doc__.splitlines()[0])
    args = add_arguments(parser).parse_args(sys.argv[1:] if argv is None else argv)
    try:
        check_args(args)
    except ValueError as exc:  # a usage error: one line and exit status 2, as the other commands do
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
