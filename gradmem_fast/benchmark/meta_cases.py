"""Meta-training step cases: a second-order write, the read loss of an answer from [M_K; query], backward.

One meta step: `M_K = write(model, M0, context, grad_mode="second")`, then the cross-entropy of a
`answer`-token answer read from `[M_K; query; answer]` (teacher forcing), then `backward()` into M0 and every
model parameter. Timed for the fast engine and the reference's second-order loop in the same run; the fast
step's peak memory is also measured at K = 8 (it must stay flat in K). Off CUDA no time or peak is a claim;
`recompute_evidence` gives what the CPU can show: the bytes autograd keeps saved and the autograd nodes of
one recomputed step.
"""
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from ..api import write
from ..reference import read
from . import cases as cases_mod
from .runner import peak_gb, rel_err, time_write

META_LR = 0.04  # the paper's inner step
FLAT_K = 8  # the fast step's peak memory at this K is compared with the case's K


@dataclass(frozen=True)
class MetaCase:
    name: str
    config: str  # key of cases.CONFIGS
    B: int
    T: int
    m: int
    dtype: str
    K: int = 2
    query: int = 16  # query tokens read after the memory
    answer: int = 16  # answer tokens whose cross-entropy is the outer loss

    @property
    def torch_dtype(self):
        return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[self.dtype]

    def resized(self, B=None, T=None):
        return replace(self, B=self.B if B is None else B, T=self.T if T is None else T)


META_CASES = (
    MetaCase("meta-gpt2", "gpt2-small", 8, 512, 8, "bf16"),
    # the paper's KV task at 16 pairs: context `!KK:VV!` x 16 is 7 * 16 + 1 = 113 tokens; the query is a key
    # `!KK:` and the answer its value `VV`
    MetaCase("meta-kv", "kv", 64, 113, 8, "fp32", query=4, answer=2),
)
META_CASE_NAMES = tuple(c.name for c in META_CASES)


def get_meta_case(name):
    for case in META_CASES:
        if case.name == name:
            return case
    raise ValueError(f"unknown meta case {name!r}; known: {', '.join(META_CASE_NAMES)}")


def build_meta_inputs(case, device, seed=0):
    """(model with every parameter requiring grad, M0 (m, d) requiring grad, context, query, answer)."""
    model = cases_mod.build_model(case, device, seed=seed, attn="sdpa")
    model.requires_grad_(True)
    V = model.config.vocab_size
    g = torch.Generator(device="cpu").manual_seed(seed)
    ids = torch.randint(0, V, (case.B, case.T), generator=g).to(device)
    query = torch.randint(0, V, (case.B, case.query), generator=g).to(device)
    answer = torch.randint(0, V, (case.B, case.answer), generator=g).to(device)
    m0 = cases_mod.MEMORY_INIT_STD * torch.randn(case.m, model.config.hidden_size, generator=g)
    m0 = m0.to(device=device, dtype=case.torch_dtype).requires_grad_(True)
    return model, m0, ids, query, answer


def meta_step(model, m0, ids, query, answer, *, steps, backend, lr=META_LR):
    """One meta step; returns M0's gradient (every parameter's .grad is set afresh)."""
    m0.grad = None
    for p in model.parameters():
        p.grad = None
    memory = write(model, m0, ids, steps=steps, lr=lr, grad_mode="second", backend=backend)
    logits = read(model, memory, torch.cat([query, answer], dim=1))
    predicted = logits[:, query.shape[1]:].float()  # logits[:, i] predicts token i of [query; answer]
    loss = F.cross_entropy(predicted.reshape(-1, predicted.shape[-1]), answer.reshape(-1))
    loss.backward()
    return m0.grad


def run_meta_case(case, device, *, warmup=1, repeats=3, seed=0):
    """Times and peaks of the fast and reference meta steps, M0's gradient agreement, the fast step's peak at
    K = FLAT_K over its peak at the case's K, and the CPU-side evidence of recompute_evidence."""
    model, m0, ids, query, answer = build_meta_inputs(case, device, seed)
    entry = {"case": case.name, "B": case.B, "T": case.T, "m": case.m, "K": case.K, "dtype": case.dtype,
             "query": case.query, "answer": case.answer, "lr": META_LR}
    grads = {}
    for backend in ("reference", "fast"):
        def call(backend=backend):
            grads[backend] = meta_step(model, m0, ids, query, answer, steps=case.K, backend=backend).clone()
        try:
            entry[f"{backend}_ms"], _ = time_write(call, device, warmup, repeats)
            entry[f"{backend}_peak_gb"] = peak_gb(call, device)
            entry[f"{backend}_reason"] = None
        except Exception as exc:  # a writer that cannot run is a result, not a crash
            entry[f"{backend}_ms"] = entry[f"{backend}_peak_gb"] = None
            entry[f"{backend}_reason"] = f"{type(exc).__name__}: {exc}"
    entry["fast_peak_k8_gb"] = peak_gb(
        lambda: meta_step(model, m0, ids, query, answer, steps=FLAT_K, backend="fast"), device)
    both = grads.get("fast") is not None and grads.get("reference") is not None
    entry["m0_grad_rel_err"] = rel_err(grads["fast"], grads["reference"]) if both else None

    def ratio(a, b):
        return None if a is None or b is None or b == 0 else a / b

    entry["reference_over_fast"] = ratio(entry["reference_ms"], entry["fast_ms"])
    entry["fast_peak_over_reference"] = ratio(entry["fast_peak_gb"], entry["reference_peak_gb"])
    entry["fast_peak_k8_over_k"] = ratio(entry["fast_peak_k8_gb"], entry["fast_peak_gb"])
    entry.update(recompute_evidence(model, m0, ids, steps=case.K))
    return entry


def recompute_evidence(model, m0, ids, *, steps, lr=META_LR):
    """Distinct bytes autograd keeps saved after the fast second-order forward (the memories M_0..M_{K-1}), and the
    autograd nodes and saved bytes of one recomputed step's graph (what the backward holds at a time), on
    whatever device the model is on. Saved parameters and M0 are references, not copies: they are left out."""
    from ..engine.recompute import memory_update, step_constants, step_loss_and_gradient

    parameter_storage = {p.untyped_storage().data_ptr() for p in [*model.parameters(), m0]}
    saved = {}  # storage address -> bytes: a tensor saved by several nodes is counted once

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in parameter_storage:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        memory = write(model, m0, ids, steps=steps, lr=lr, grad_mode="second", backend="fast")
    forward_bytes = sum(saved.values())
    del memory
    saved.clear()
    consts = step_constants(ids, torch.ones_like(ids), m0.shape[-2], m0.dtype, lr, None, None, None, None)
    leaf = m0.detach().expand(ids.shape[0], -1, -1).clone().requires_grad_(True)
    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, grad = step_loss_and_gradient(model, consts, leaf)
        nxt = memory_update(consts, leaf, grad)
    nodes, stack = set(), [nxt.grad_fn, loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in nodes:
            continue
        nodes.add(node)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return {"forward_saved_bytes": forward_bytes, "recompute_step_nodes": len(nodes),
            "recompute_step_saved_bytes": sum(saved.values())}
