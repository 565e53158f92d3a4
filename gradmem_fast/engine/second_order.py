"""Meta-gradients through the fast write: grad_mode="second" (optionally only the last j steps), and
differentiable per-step losses under "first" and "second", with memory flat in K (second_order.md).

Forward: the engine's first-order steps without autograd (the captured CUDA graph where the first-order
write would replay it, else the eager loop), keeping M_0 .. M_{K-1} (B*m*d each), nothing of the steps'
activations. Backward: for k = K-1 .. 0, step k is recomputed under autograd with ops that differentiate
twice (recompute.py) and the vector-Jacobian product of
(M_{k+1} = M_k - lr * clip(g(M_k)), loss_k) with respect to M_k and every parameter that requires grad
is formed; that step's graph is freed before the next one is built.
"""
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch.autograd.function import once_differentiable

from .. import validation
from ..kernels.device import on_device
from .plan import build_plan
from .recompute import StepConstants, memory_update, step_constants, step_loss_and_gradient
from .specs import check_length, spec_of
from .step import write_step


def meta_parameters(model, write_head, memory_proj):
    """The tensors besides the memory that a meta-gradient reaches, each once: the model's parameters, the
    write head and the projection's weight and bias, those that require grad (the others cost nothing)."""
    candidates = [*model.parameters(), write_head]
    if memory_proj is not None:
        candidates += list(memory_proj.parameters())
    found, seen = [], set()
    for t in candidates:
        if t is not None and t.requires_grad and id(t) not in seen:
            seen.add(id(t))
            found.append(t)
    return found


def recompute_reason(spec):
    """None when the recomputed step (recompute.py) reproduces this model's step, else why not.

    It refuses nothing the first-order engine accepts: the recompute runs the engine's own block structures
    (layers.layer_forward / layer_backward: pre-norm, post-norm, sandwich, parallel) and sublayers (the MLPs,
    the add + norms with their offsets folded), with only the attention sublayer swapped for an
    out-of-place one (recompute_attention.py) that covers every q/k/v layout, q/k norm and per-layer rotary
    of the spec, and it embeds as plan.build_plan does (embedding scale, learned positions). A structure added
    to layers.py is therefore covered by both; this is where a spec the out-of-place attention cannot take
    would be named."""
    return None


def needs_meta_write(model, memory, grad_mode, return_losses, write_head, memory_proj):
    """Whether a fast write must go through MetaWrite: grad_mode "second", or "first" with losses that
    must be differentiable (something they depend on requires grad)."""
    if grad_mode == "second":
        return True
    if grad_mode != "first" or not return_losses:
        return False
    return memory.requires_grad or bool(meta_parameters(model, write_head, memory_proj))


@dataclass
class MetaSetup:
    """Everything of one write that is not a differentiable input of MetaWrite."""
    model: Any
    spec: Any  # models.spec.ModelSpec (the fast step's, built without a graph)
    ops: Any  # engine.ops.Ops of the forward steps
    consts: StepConstants
    attention_mask: torch.Tensor  # (B, T)
    steps: int
    first_order_steps: int  # steps k < first_order_steps are M_{k+1} = M_k - lr * stopgrad(g_k)
    losses_differentiable: bool
    real_rows: int
    write_head: Optional[torch.Tensor]
    B: int
    signature: Any = None  # specs.spec_of's, for the graph cache key
    use_graphs: bool = False  # the forward replays the first-order write's captured step
    lr: float = 0.0  # the step size as a host float (the graph path fills its own lr tensor with it)


class MetaWrite(torch.autograd.Function):
    """(setup, memory (1 or B, m, d), *parameters) -> (M_K (B, m, d), losses (B, K) float32)."""

    @staticmethod
    def forward(ctx, setup, memory, *parameters):
        consts = setup.consts
        current = memory.expand(setup.B, *memory.shape[1:]).clone(memory_format=torch.contiguous_format)
        losses = torch.empty(setup.B, setup.steps, dtype=torch.float32, device=current.device)
        memories = []
        if setup.use_graphs:
            from .graphs import graph_write  # makes the tensors' device current itself

            with torch.no_grad():
                current = graph_write(setup.model, setup.spec, setup.signature, setup.ops, current, consts.input_ids,
                                      setup.attention_mask, steps=setup.steps, lr=setup.lr,
                                      write_head=setup.write_head, memory_proj=consts.memory_proj,
                                      clip_value=consts.clip_value, clip_norm=consts.clip_norm, losses=losses,
                                      real_rows=setup.real_rows, memories=memories)
        elif setup.steps > 0:
            with torch.no_grad(), on_device(current):
                plan = build_plan(setup.spec, setup.ops, consts.input_ids, setup.attention_mask, consts.m,
                                  current.dtype, setup.write_head, consts.memory_proj,
                                  head_rows_count=setup.real_rows)
                step_loss = torch.empty(setup.B, dtype=torch.float32, device=current.device)
                for k in range(setup.steps):
                    memories.append(current.clone())
                    write_step(plan, current, consts.lr, step_loss, consts.clip_value, consts.clip_norm)
                    losses[:, k].copy_(step_loss)
        ctx.setup = setup
        ctx.memory_batch = memory.shape[0]
        ctx.save_for_backward(*memories, *parameters)
        if not setup.losses_differentiable:
            ctx.mark_non_differentiable(losses)
        return current, losses

    @staticmethod
    @once_differentiable
    def backward(ctx, d_result, d_losses):
        setup = ctx.setup
        saved = ctx.saved_tensors
        memories, parameters = saved[:setup.steps], saved[setup.steps:]
        d_memory = d_result
        d_parameters = [None] * len(parameters)
        for k in reversed(range(setup.steps)):
            second = k >= setup.first_order_steps
            if not second and not setup.losses_differentiable:
                continue  # a first-order step passes d M_{k+1} to M_k unchanged
            d_step = _step_vjp(setup, memories[k], parameters, second, d_memory,
                               d_losses[:, k] if setup.losses_differentiable else None)
            d_memory = d_step[0] if second else d_memory + d_step[0]
            for i, d in enumerate(d_step[1:]):
                if d is not None:
                    d_parameters[i] = d if d_parameters[i] is None else d_parameters[i] + d
        if ctx.memory_batch != setup.B:  # a shared (1, m, d) initial memory: its gradient sums over samples
            d_memory = d_memory.sum(dim=0, keepdim=True)
        return (None, d_memory, *d_parameters)


def _step_vjp(setup, memory_k, parameters, second, d_next, d_loss):
    """Gradients w.r.t. (M_k, *parameters) of <d_next, M_{k+1}> (second-order step) + <d_loss, loss_k>.
    One step's graph lives only inside this call."""
    leaf = memory_k.detach().requires_grad_(True)
    with torch.enable_grad():
        loss, grad = step_loss_and_gradient(setup.model, setup.consts, leaf, with_gradient=second)
        outputs, seeds = [], []
        if second:
            outputs.append(memory_update(setup.consts, leaf, grad))
            seeds.append(d_next)
        if d_loss is not None:
            outputs.append(loss)
            seeds.append(d_loss)
        found = torch.autograd.grad(outputs, [leaf, *parameters], seeds, allow_unused=True)
    d_leaf = found[0] if found[0] is not None else torch.zeros_like(leaf)
    return (d_leaf, *found[1:])


def meta_write(model, memory, input_ids, attention_mask, *, steps, lr, write_head, memory_proj, clip_value,
               clip_norm, grad_mode, return_losses, ops, second_order_steps=None, use_graphs=False):
    """The fast write under grad_mode "second", or "first" with differentiable losses (arguments as
    engine.fast_write, already validated; ops: the engine's Ops for the forward steps; use_graphs: whether
    the forward steps replay the captured CUDA graph)."""
    validation.check_second_order_steps(second_order_steps, steps, grad_mode)
    B, T = input_ids.shape
    m = memory.shape[-2]
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    spec, signature = spec_of(model)
    check_length(spec, m, T)
    if grad_mode == "second":
        first_order_steps = 0 if second_order_steps is None else steps - second_order_steps
    else:
        first_order_steps = steps
    parameters = meta_parameters(model, write_head, memory_proj)
    losses_differentiable = return_losses and (memory.requires_grad or bool(parameters))
    consts = step_constants(input_ids, attention_mask, m, memory.dtype, lr, write_head, memory_proj, clip_value,
                            clip_norm, op_backend=ops.backend)
    setup = MetaSetup(model=model, spec=spec, ops=ops, consts=consts, attention_mask=attention_mask, steps=steps,
                      first_order_steps=first_order_steps, losses_differentiable=losses_differentiable,
                      real_rows=int(attention_mask.sum()), write_head=write_head, B=B, signature=signature,
                      use_graphs=use_graphs and steps > 0, lr=lr)
    result, losses = MetaWrite.apply(setup, memory, *parameters)
    if grad_mode == "first":  # as fast_write's first order: the result's graph is the identity to M0 alone
        start = memory.expand(B, *memory.shape[1:])
        result = start + (result - start).detach()
    if return_losses:
        return result, losses
    return result
