"""Which rows reach the head, what the final norm's backward sees, and what a step does not copy."""
import pytest
import torch

import gradmem_fast.reference
from engine_cases import model_pair
from gradmem_fast.engine.ops import Ops
from gradmem_fast.engine.plan import build_plan, real_first
from gradmem_fast.engine.specs import spec_of
from gradmem_fast.engine.step import write_step
from helpers import random_batch, rel_err


class SpyOps(Ops):
    """Reference ops that record the head's inputs and the final norm's incoming gradient, and mark every op
    call for the profiler."""

    def __init__(self):
        super().__init__("reference")
        self.head_calls, self.norm_grads = [], []

    def head_loss(self, hidden, weight, targets, row_weights, loss_out, grad_out):
        self.head_calls.append((hidden.clone(), targets.clone(), row_weights.clone()))
        return super().head_loss(hidden, weight, targets, row_weights, loss_out, grad_out)

    def add_norm_forward(self, x, residual, norm, kind):
        out = super().add_norm_forward(x, residual, norm, kind)
        self.last_norm_out = out[0]
        return out

    def add_norm_backward(self, dy, d_residual_out, residual_out, norm, stats, kind):
        self.norm_grads.append(dy.clone())
        return super().add_norm_backward(dy, d_residual_out, residual_out, norm, stats, kind)


def _steps(family, B, T, lengths, m, steps, ops, head_rows_count=None, seed=0):
    model, _ = model_pair(family)
    ids, mask, memory = random_batch(model, B, T, lengths=lengths, m=m, seed=seed)
    spec, _ = spec_of(model)
    state = memory.expand(B, m, -1).clone(memory_format=torch.contiguous_format)
    lr = torch.full((), 0.5)
    losses = torch.empty(B, steps)
    with torch.no_grad():
        plan = build_plan(spec, ops, ids, mask, m, state.dtype, head_rows_count=head_rows_count)
        for k in range(steps):
            step_loss = torch.empty(B)
            write_step(plan, state, lr, step_loss)
            losses[:, k] = step_loss
    return state, losses, plan, (model, ids, mask, memory)


def test_real_first_order():
    real = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 0]], dtype=torch.bool).reshape(-1)
    assert real_first(real, 12).tolist() == [0, 1, 4, 8, 9, 10, 2, 3, 5, 6, 7, 11]
    assert real_first(real, 6).tolist() == [0, 1, 4, 8, 9, 10]


@pytest.mark.parametrize("family, B, lengths", [("gpt2", 3, [9, 4, 1]), ("llama", 1, [5]), ("gpt_neox", 2, [9, 6])])
def test_padded_rows_never_reach_the_head(family, B, lengths):
    """With R = the number of real tokens the head sees exactly the real rows, the final-norm rows m-1+i,
    and the write still matches the float64 reference."""
    T, m, steps = 9, 3, 2
    ops = SpyOps()
    R = sum(lengths)
    state, losses, plan, (_, ids, mask, memory) = _steps(family, B, T, lengths, m, steps, ops, R)
    hidden, targets, weights = ops.head_calls[-1]
    assert hidden.shape[0] == R and bool((weights > 0).all())
    expected_rows = torch.cat([ops.last_norm_out[b, m - 1:m - 1 + L] for b, L in enumerate(lengths)])
    assert torch.equal(hidden, expected_rows)
    assert torch.equal(targets, torch.cat([ids[b, :L] for b, L in enumerate(lengths)]))
    _, model64 = model_pair(family)
    ref, ref_losses = gradmem_fast.reference.write(model64, memory.double()[None], ids, mask, steps=steps, lr=0.5,
                                                   return_losses=True)
    assert rel_err(state, ref) < 1e-4 and rel_err(losses, ref_losses) < 1e-4


@pytest.mark.parametrize("family, B, lengths", [("gpt2", 3, [9, 4, 1]), ("llama", 1, [6])])
def test_final_norm_gradient_only_on_head_rows(family, B, lengths):
    """Over several steps the final norm's incoming gradient is nonzero only on rows m-1 .. m-2+L_b: the
    memory rows before m-1, the last row and padding get exactly zero, without per-step clearing."""
    T, m, steps = 9, 3, 3
    ops = SpyOps()
    _steps(family, B, T, lengths, m, steps, ops)
    layers = model_pair(family)[0].config.num_hidden_layers
    per_step = len(ops.norm_grads) // steps
    assert per_step >= 2 * (layers - 1) + 1
    for k in range(steps):
        dy = ops.norm_grads[k * per_step]  # the first norm backward of a step is the final norm's
        assert dy.shape == (B, m + T, dy.shape[-1])
        for b, L in enumerate(lengths):
            head = dy[b, m - 1:m - 1 + L]
            assert bool((head != 0).any(dim=-1).all())
            assert bool((dy[b, :m - 1] == 0).all()) and bool((dy[b, m - 1 + L:] == 0).all())


def test_head_rows_count_out_of_range():
    model, _ = model_pair("llama")
    ids, mask, _ = random_batch(model, 2, 5, m=2)
    spec, _ = spec_of(model)
    for R in (0, 11):
        with pytest.raises(ValueError, match="head_rows_count"):
            build_plan(spec, Ops("reference"), ids, mask, 2, torch.float32, head_rows_count=R)


class MarkedOps(Ops):
    def __getattribute__(self, name):
        attr = super().__getattribute__(name)
        if name.startswith("_") or not callable(attr):
            return attr

        def marked(*args, **kwargs):
            with torch.profiler.record_function("engine_op::" + name):
                return attr(*args, **kwargs)
        return marked


def _inside_op(event):
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith("engine_op::"):
            return True
        parent = parent.cpu_parent
    return False


@pytest.mark.parametrize("family", ["gpt2", "llama", "gpt_neox"])
def test_step_makes_no_full_size_concatenation_or_clearing(family):
    """Between the ops a step concatenates nothing (layer-0 rows, q/k/v gradients) and clears nothing."""
    model, _ = model_pair(family)
    ids, mask, memory = random_batch(model, 2, 7, lengths=[7, 3], m=3)
    spec, _ = spec_of(model)
    ops = MarkedOps("reference")
    state = memory.expand(2, 3, -1).contiguous()
    with torch.no_grad():
        plan = build_plan(spec, ops, ids, mask, 3, state.dtype)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            write_step(plan, state, torch.full((), 0.5), torch.empty(2))
    events = prof.events()
    assert any(e.name.startswith("engine_op::head_loss") for e in events)
    # aten calls made by the engine itself (not by an op, nor inside another aten call)
    outside = {e.name for e in events if e.name.startswith("aten::") and not _inside_op(e)
               and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::"))}
    assert "aten::index_select" in outside or plan.B == 1
    forbidden = {"aten::cat", "aten::stack", "aten::zeros_like", "aten::zeros", "aten::zero_", "aten::fill_"}
    assert not outside & forbidden
