"""Meta-gradients through the fast write (engine.second_order) against the float64 reference's autograd.

The fast write runs in float32 (its steps on the ops' twins, op_backend "reference": the backward recomputes
each step with ops whose backward is a written second-order rule; test_second_order_on_the_kernels runs
attention and the head + loss on their Triton kernels under the interpreter); the reference runs the same
model upcast to float64 with Hugging Face's float32 casts lifted (models.hf64). Every gradient is compared:
the initial memory, every model parameter (embeddings, attention, MLP, norms: q/k norms and post norms too, LM
head), the write head and the projection's weight and bias; a frozen parameter must get none on either side.
"""
import copy
import warnings
import weakref

import pytest
import torch

import gradmem_fast
from engine_cases import TRITON_OPS, WIDE, cast, fast_kwargs, make_options, refuse_twins
from gradmem_fast.engine import fast_reason, fast_write
from gradmem_fast.engine.ops import ops_for
from gradmem_fast.engine.second_order import meta_parameters
from gradmem_fast.ops import (activation_double_backward, attention, attention_double_backward,
                              head_loss_double_backward, norm_double_backward)
from helpers import FAMILIES, random_batch, rel_err, tiny_model
from models.hf64 import hf_float64

TOL_FP32 = 1e-4


def _models(family, seed, frozen=(), widths=None):
    """The same tiny model in float32 and float64, every parameter requiring grad but those whose name contains
    one of `frozen`; `widths` overrides the config (engine_cases.WIDE: head dim 16 for the kernels)."""
    model64 = tiny_model(family, dtype=torch.float64, seed=seed, **(widths or {}))
    model32 = copy.deepcopy(model64).float()
    for model in (model32, model64):
        for name, p in model.named_parameters():
            p.requires_grad_(not any(part in name for part in frozen))
    return model32, model64


def _trainable(options):
    """The options with the write head and the projection requiring grad; (options, their tensors)."""
    tensors = []
    if "write_head" in options:
        options["write_head"] = options["write_head"].clone().requires_grad_(True)
        tensors.append(options["write_head"])
    if "memory_proj" in options:
        options["memory_proj"].requires_grad_(True)
        tensors += [options["memory_proj"].weight, options["memory_proj"].bias]
    return options, tensors


def _outer(out, losses, seed):
    """A fixed random outer loss of M_K and of every inner loss."""
    g = torch.Generator().manual_seed(seed)
    w_out = torch.randn(out.shape, generator=g, dtype=torch.float64)
    w_loss = torch.randn(losses.shape, generator=g, dtype=torch.float64)
    return (out.double() * w_out).sum() + (losses.double() * w_loss).sum()


def meta_both(family, *, B, T, lengths, m, steps, second_order_steps, option_names=(), grad_mode="second",
              per_sample_memory=False, lr=0.4, seed=0, frozen=(), op_backend="reference", widths=None):
    """{name: (fast fp32 gradient, reference fp64 gradient)} of one outer loss (the .grad each backward leaves,
    None where it leaves none), checking the written memories and losses on the way."""
    model32, model64 = _models(family, seed, frozen, widths)
    ids, mask, memory = random_batch(model64, B, T, lengths=lengths, seed=seed + 1, m=m)
    memory = memory[None]
    if per_sample_memory:
        g = torch.Generator().manual_seed(seed + 2)
        memory = memory + 0.1 * torch.randn(B, *memory.shape[1:], generator=g, dtype=torch.float64)
    options64 = make_options(model64, option_names, seed=seed + 3)
    options32, extra32 = _trainable(cast(options64, torch.float32))
    options64, extra64 = _trainable(options64)
    names = ["memory"] + [n for n, _ in model64.named_parameters()] + [f"option{i}" for i in range(len(extra64))]
    kw = dict(steps=steps, lr=lr, grad_mode=grad_mode, return_losses=True)
    if grad_mode == "second":
        kw["second_order_steps"] = second_order_steps

    start64 = memory.clone().requires_grad_(True)
    with hf_float64(model64):
        ref, ref_losses = gradmem_fast.reference.write(model64, start64, ids, mask, **kw, **options64)
        _outer(ref, ref_losses, seed).backward()

    start32 = memory.float().clone().requires_grad_(True)
    out, losses = fast_write(model32, start32, ids, mask, op_backend=op_backend, **kw,
                             **fast_kwargs(options32))
    assert out.requires_grad and losses.requires_grad
    _outer(out, losses, seed).backward()
    assert rel_err(out.detach(), ref.detach()) < TOL_FP32
    assert rel_err(losses.detach(), ref_losses.detach()) < TOL_FP32
    grads = [t.grad for t in (start32, *model32.parameters(), *extra32)]
    ref_grads = [t.grad for t in (start64, *model64.parameters(), *extra64)]
    return dict(zip(names, zip(grads, ref_grads)))


def check_gradients(pairs):
    for name, (got, want) in pairs.items():
        if want is None:  # frozen, or not used by the write (the LM head beside a write head)
            assert got is None, name
            continue
        assert got.shape == want.shape, name
        assert want.abs().max() > 0, f"{name}: the reference gradient is zero, the check would be empty"
        assert rel_err(got, want) < TOL_FP32, f"{name}: {rel_err(got, want):.3g}"


# (family, B, T, lengths, m, K, second_order_steps, options, per-sample memory)
CASES = [
    ("llama", 2, 7, [7, 4], 3, 2, None, ("write_head", "memory_proj"), False),
    ("gpt2", 2, 6, [6, 3], 2, 2, None, ("write_head", "memory_proj"), False),
    ("gpt_neox", 2, 6, [4, 6], 3, 2, 1, ("memory_proj",), True),
    ("qwen2", 1, 7, None, 2, 1, None, ("write_head",), False),
    ("llama", 1, 6, None, 2, 5, 1, ("clip_value",), False),
    ("gpt2", 3, 5, [5, 2, 4], 2, 5, None, ("clip_norm",), False),
    ("qwen2", 2, 6, [6, 5], 4, 2, 1, ("clip_value", "clip_norm", "memory_proj"), True),
    ("gpt_neox", 1, 5, None, 1, 1, None, ("write_head", "clip_norm"), False),
    # q/k norm per head (Qwen3); post-norm with q/k norms over the projections (OLMo 2); fused qkv and gate_up,
    # partial rotary (Phi-3); sandwich norms with 1 + w, GeGLU, scaled embeddings, local and global rotary
    # (Gemma 3). Each: B 1 and B > 1 (ragged), a write head, the projection, both clips, K 1 / 2 / 5,
    # second_order_steps None and 1; the cases without a write head check the LM head's gradient.
    ("qwen3", 2, 7, [7, 4], 3, 2, None, ("write_head", "memory_proj"), False),
    ("qwen3", 1, 6, None, 2, 5, 1, ("clip_value",), False),
    ("olmo2", 2, 6, [6, 3], 2, 2, 1, ("memory_proj", "clip_norm"), True),
    ("olmo2", 1, 5, None, 2, 1, None, ("write_head",), False),
    ("phi3", 3, 5, [5, 2, 4], 2, 5, None, ("clip_norm",), False),
    ("phi3", 1, 6, None, 3, 2, 1, ("write_head", "memory_proj", "clip_value"), False),
    ("gemma3_text", 2, 6, [4, 6], 3, 2, 1, ("clip_value", "clip_norm", "memory_proj"), True),
    ("gemma3_text", 1, 7, None, 2, 5, None, ("write_head",), False),
    ("gemma3_text", 2, 5, [5, 3], 2, 1, None, (), False),
]


@pytest.mark.parametrize("family, B, T, lengths, m, steps, second_order_steps, option_names, per_sample", CASES)
def test_second_order_gradients_match_reference(family, B, T, lengths, m, steps, second_order_steps,
                                                option_names, per_sample):
    pairs = meta_both(family, B=B, T=T, lengths=lengths, m=m, steps=steps, second_order_steps=second_order_steps,
                      option_names=option_names, per_sample_memory=per_sample, seed=len(option_names) + steps)
    check_gradients(pairs)


# the second-order ops that run as Triton kernels on the write's op backend: attention's forward, backward and
# double backward (ops.attention_double_backward), the head + loss op's, the norms' and the activations'
# double backwards
SECOND_ORDER_KERNEL_OPS = {
    attention_double_backward: ("attention_op_forward", "attention_op_backward", "attention_double_backward"),
    head_loss_double_backward: ("head_loss_double_backward",),
    norm_double_backward: ("add_norm_double_backward", "qk_norm_double_backward"),
    activation_double_backward: ("activation_double_backward",),
}


@pytest.mark.needs_triton
@pytest.mark.parametrize("family, B, T, lengths, m, steps, second_order_steps, option_names", [
    ("llama", 2, 7, [7, 4], 3, 2, None, ("write_head", "memory_proj")),
    ("gemma3_text", 2, 6, [4, 6], 2, 2, 1, ("clip_norm",)),
    ("gpt2", 1, 5, None, 2, 1, None, ()),
    ("gpt_neox", 2, 5, [5, 3], 2, 1, None, ()),
    ("olmo2", 1, 6, None, 2, 2, 1, ("write_head",)),
])
def test_second_order_on_the_kernels(family, B, T, lengths, m, steps, second_order_steps, option_names,
                                     monkeypatch):
    """op_backend "auto" under the interpreter: the forward steps on the first-order kernels, the recomputed
    steps' attention, head + loss, norm and activation double backwards on theirs (rotary and the linears
    on torch ops); a fallback to a twin fails the test."""
    refuse_twins(monkeypatch, {attention: TRITON_OPS[attention], **SECOND_ORDER_KERNEL_OPS})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"triton\.")
        pairs = meta_both(family, B=B, T=T, lengths=lengths, m=m, steps=steps,
                          second_order_steps=second_order_steps, option_names=option_names, seed=5,
                          op_backend="auto", widths=WIDE[family])
    check_gradients(pairs)


@pytest.mark.parametrize("family", ["llama", "gpt2", "olmo2", "gemma3_text"])
def test_first_order_losses_are_differentiable(family):
    pairs = meta_both(family, B=2, T=6, lengths=[6, 3], m=2, steps=2, second_order_steps=None,
                      option_names=("write_head",), grad_mode="first", seed=4)
    check_gradients(pairs)


def test_clipping_is_active_in_the_checks():
    """The clip settings of CASES bind: a clipped write differs from the plain one (so the gradient checks
    of clip_value and clip_norm test the clip's derivative)."""
    model = tiny_model("llama", dtype=torch.float32, seed=3)
    ids, mask, memory = random_batch(model, 1, 6, m=2, seed=4)
    plain = fast_write(model, memory[None], ids, mask, steps=1, lr=0.4, grad_mode="none", return_losses=False,
                       op_backend="reference", **fast_kwargs({}))
    for option in ("clip_value", "clip_norm"):
        clipped = fast_write(model, memory[None], ids, mask, steps=1, lr=0.4, grad_mode="none", return_losses=False,
                             op_backend="reference", **fast_kwargs(make_options(model, (option,))))
        assert rel_err(clipped, plain) > 1e-3


@pytest.mark.parametrize("family, frozen", [
    ("gemma3_text", ("embed_tokens", "q_norm", "k_norm", "post_", "layers.1.mlp")),
    ("olmo2", ("norm", "layers.0.self_attn", "lm_head")),
    ("qwen3", ("k_norm", "up_proj")),
    ("phi3", ("qkv_proj", "layers.1")),
])
def test_partly_frozen_model(family, frozen):
    """Parameters with requires_grad=False get no gradient from the fast second-order write (their .grad stays
    None, as the reference's); the others match the reference."""
    pairs = meta_both(family, B=2, T=6, lengths=[6, 4], m=2, steps=2, second_order_steps=None, seed=11,
                      frozen=frozen)
    model = _models(family, 11, frozen)[0]
    names = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert names and len(names) < len(list(model.parameters()))  # some frozen, some not
    assert all(pairs[n][0] is None and pairs[n][1] is None for n in names)
    check_gradients(pairs)


def test_frozen_parameters_get_nothing():
    model = tiny_model("gpt2", dtype=torch.float32, seed=2)  # every parameter frozen
    ids, mask, memory = random_batch(model, 2, 5, lengths=[5, 3], m=2, seed=3)
    assert meta_parameters(model, None, None) == []
    start = memory[None].clone().requires_grad_(True)
    out = fast_write(model, start, ids, mask, steps=2, lr=0.3, grad_mode="second", return_losses=False,
                     op_backend="reference", **fast_kwargs({}))
    out.square().sum().backward()
    assert start.grad is not None and torch.isfinite(start.grad).all()
    assert all(p.grad is None for p in model.parameters())


class SavedBytes:
    """saved_tensors_hooks that track the bytes autograd keeps saved: live now and the peak."""

    def __init__(self):
        self.live = self.peak = 0

    def _release(self, n):
        self.live -= n

    def pack(self, t):
        n = t.numel() * t.element_size()
        self.live += n
        self.peak = max(self.peak, self.live)
        holder = [t]
        box = _Box(holder)
        weakref.finalize(box, self._release, n)
        return box

    @staticmethod
    def unpack(box):
        return box.holder[0]


class _Box:
    def __init__(self, holder):
        self.holder = holder


def _peak_saved_bytes(write, steps):
    model = tiny_model("llama", dtype=torch.float32, seed=6)
    model.requires_grad_(True)
    ids, mask, memory = random_batch(model, 2, 12, lengths=[12, 8], m=4, seed=7)
    start = memory[None].clone().requires_grad_(True)
    counter = SavedBytes()
    with torch.autograd.graph.saved_tensors_hooks(counter.pack, counter.unpack):
        out, losses = write(model, start, ids, mask, steps=steps, lr=0.3, grad_mode="second", return_losses=True)
        (out.square().sum() + losses[:, -1].sum()).backward()
    return counter.peak, out.numel() * out.element_size()


def _fast(model, start, ids, mask, **kw):
    return fast_write(model, start, ids, mask, op_backend="reference", **fast_kwargs({}), **kw)


def test_saved_memory_is_flat_in_steps():
    """Peak bytes saved by autograd over forward and backward: the fast write's grow by exactly the extra
    memories M_k it keeps (B*m*d each), the reference loop's by whole steps of activations."""
    fast2, memory_bytes = _peak_saved_bytes(_fast, 2)
    fast8, _ = _peak_saved_bytes(_fast, 8)
    ref2, _ = _peak_saved_bytes(gradmem_fast.reference.write, 2)
    ref8, _ = _peak_saved_bytes(gradmem_fast.reference.write, 8)
    assert fast2 > 50 * memory_bytes  # the backward's recomputed step graph is counted too
    assert fast8 - fast2 <= 6 * memory_bytes
    one_step = (ref8 - ref2) / 6
    assert one_step > 50 * memory_bytes  # the reference keeps every step's activations: a real difference
    assert fast2 < ref2 and fast8 < 0.5 * ref8


def test_forward_on_the_graph_path_keeps_each_steps_memory(monkeypatch):
    """With use_graphs the forward steps go through graphs.graph_write, which hands back M_0 .. M_{K-1}; here a
    stand-in replays the eager loop (a capture needs CUDA): the gradients equal the eager forward's exactly,
    and no host float is read from the step-size tensor."""
    from gradmem_fast.engine import graphs
    from gradmem_fast.engine.plan import build_plan
    from gradmem_fast.engine.second_order import meta_write
    from gradmem_fast.engine.step import write_step

    calls = []

    def eager_graph_write(model, spec, signature, ops, start, input_ids, attention_mask, *, steps, lr, write_head,
                          memory_proj, clip_value, clip_norm, losses, real_rows, memories):
        calls.append((steps, lr))
        plan = build_plan(spec, ops, input_ids, attention_mask, start.shape[1], start.dtype, write_head, memory_proj,
                          head_rows_count=real_rows)
        memory, lr_t = start.clone(), torch.full((), lr, dtype=torch.float32)
        step_loss = torch.empty(start.shape[0], dtype=torch.float32)
        for k in range(steps):
            memories.append(memory.clone())
            write_step(plan, memory, lr_t, step_loss, clip_value, clip_norm)
            losses[:, k].copy_(step_loss)
        return memory

    monkeypatch.setattr(graphs, "graph_write", eager_graph_write)
    model = tiny_model("llama", dtype=torch.float32, seed=8)
    model.requires_grad_(True)
    ids, mask, memory = random_batch(model, 2, 7, lengths=[7, 4], m=3, seed=9)
    grads = []
    for use_graphs in (False, True):
        start = memory[None].clone().requires_grad_(True)
        out, losses = meta_write(model, start, ids, mask, steps=3, lr=0.3, write_head=None, memory_proj=None,
                                 clip_value=None, clip_norm=None, grad_mode="second", return_losses=True,
                                 ops=ops_for("reference"), use_graphs=use_graphs)
        grads.append(torch.autograd.grad(_outer(out, losses, 3), [start, *model.parameters()]))
    assert calls == [(3, 0.3)]
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_first_order_result_reaches_only_the_memory():
    """Under "first" with differentiable losses, M_K's graph is the identity to M0, as in the reference."""
    model = tiny_model("gpt2", dtype=torch.float32, seed=4)
    model.get_input_embeddings().weight.requires_grad_(True)
    ids, mask, memory = random_batch(model, 2, 5, m=2, seed=5)
    out, losses = fast_write(model, memory[None], ids, mask, steps=2, lr=0.3, grad_mode="first", return_losses=True,
                             op_backend="reference", **fast_kwargs({}))
    assert not out.requires_grad and losses.requires_grad
    start = memory[None].clone().requires_grad_(True)
    out = fast_write(model, start, ids, mask, steps=2, lr=0.3, grad_mode="first", return_losses=True,
                     op_backend="reference", **fast_kwargs({}))[0]
    weights = torch.randn_like(out)
    (out * weights).sum().backward()
    assert torch.allclose(start.grad, weights.sum(0, keepdim=True), rtol=0, atol=1e-6)
    assert model.get_input_embeddings().weight.grad is None


@pytest.mark.parametrize("family", FAMILIES)
def test_second_order_fast_write_is_not_refused(family, monkeypatch):
    """Every family the first-order engine takes also takes the fast second-order write (and first-order
    writes with differentiable losses): nothing is refused, and backend="fast" runs it, without a warning."""
    model = tiny_model(family, dtype=torch.float32, seed=2)
    model.requires_grad_(True)
    ids, mask, memory = random_batch(model, 2, 5, lengths=[5, 3], m=2, seed=3)
    kw = dict(write_head=None, memory_proj=None, seq_len=7)
    assert fast_reason(model, memory, grad_mode="first", **kw) is None
    assert fast_reason(model, memory, grad_mode="second", **kw) is None
    assert fast_reason(model, memory, grad_mode="first", return_losses=True, **kw) is None
    choice = gradmem_fast.explain(model, memory, ids, mask, grad_mode="second", backend="fast")
    assert choice.backend == "fast" and choice.blockers == (), str(choice)
    start = memory.clone().requires_grad_(True)
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the engine's ops use their PyTorch twins here, no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = gradmem_fast.write(model, start, ids, mask, steps=2, lr=0.1, grad_mode="second", backend="fast")
    assert out.shape == (2, 2, model.config.hidden_size) and out.requires_grad
    out.square().sum().backward()
    assert torch.isfinite(start.grad).all() and start.grad.abs().max() > 0
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
