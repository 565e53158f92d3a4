"""Launch budget of one fast write step, counted on the CPU (gradmem_fast.engine.launches).

Every op runs on its kernel (Triton under the interpreter, csrc through the CPU emulator of
tests/csrc_emulation), at tiny widths with the standard cases' layer counts, families and dtypes (16-bit
counted as float16). A step must not issue more launches than BUDGET allows, per layer >= 1, at layer 0
and for the rest of the step (memory in and out, final norm, head + loss, update). Batch cases run at
B = 4: launch counts depend on B only through B == 1 vs B > 1.
"""
import os
import sys

import pytest
import torch
import torch.nn.functional as F

from engine_cases import WIDE
from gradmem_fast.benchmark.cases import get_case
from gradmem_fast.engine import sublayers
from gradmem_fast.benchmark.launch_counts import count_case
from gradmem_fast.engine.launches import LaunchCounter, count_write, launch_kind
from gradmem_fast.engine.ops import ops_for
from gradmem_fast.models import describe
from helpers import random_batch, tiny_model

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc_emulation"))
import emu_build  # noqa: E402

# launches per step: each layer >= 1, layer 0 and the rest, the last two as (B == 1, B > 1)
BUDGET = {
    "gpt2": dict(layer=17, layer0=(19, 20), rest=(8, 10)),
    "llama": dict(layer=21, layer0=(24, 24), rest=(7, 9)),
    "gpt_neox": dict(layer=19, layer0=(22, 23), rest=(7, 9)),
    # Llama + the q/k norm: one forward and one backward launch per layer for q and k together
    "qwen3": dict(layer=23, layer0=(26, 26), rest=(7, 9)),
    # post-norm: the streams h + delta are plain adds (2 forward, 2 backward) next to the two output norms;
    # the q/k norm over whole projections is two launches each way where H != Hkv (the tiny model), one where
    # H == Hkv (the released OLMo 2 models: 2 launches fewer per layer)
    "olmo2": dict(layer=29, layer0=(31, 31), rest=(7, 9)),
    "phi3": dict(layer=21, layer0=(24, 24), rest=(7, 9)),  # Llama's: the fused projections are views
    # Qwen3's, plus the two output norms of the sandwich (forward and backward); GeGLU is one kernel each way
    "gemma3_text": dict(layer=27, layer0=(30, 30), rest=(7, 9)),
}
REST = ("memory", "head", "update")


def over_budget(counter, family, B):
    """Why the counted step exceeds its budget, one line per phase; empty when within it."""
    budget, batched = BUDGET[family], int(B > 1)
    phases, errors = counter.by("phase"), []
    per_layer = counter.per_layer()
    for i, n in enumerate(per_layer, start=1):
        if n > budget["layer"]:
            errors.append(f"layer {i}: {n} launches > {budget['layer']}")
    if phases["layer0"] > budget["layer0"][batched]:
        errors.append(f"layer 0: {phases['layer0']} launches > {budget['layer0'][batched]}")
    rest = sum(phases[p] for p in REST)
    if rest > budget["rest"][batched]:
        errors.append(f"memory + head + update: {rest} launches > {budget['rest'][batched]}")
    if phases["other"]:
        errors.append(f"{phases['other']} launches outside any engine phase")
    if errors:
        ops = sorted((f"{p} {k}:{op}", n) for (p, k, op), n in counter.counts.items())
        errors.append("counted: " + ", ".join(f"{op} x{n}" for op, n in ops))
    return errors


@pytest.fixture(scope="module")
def emulated_csrc():
    reason = emu_build.missing_reason()
    if reason is not None:
        pytest.skip(f"emulated csrc build unavailable: {reason}")
    emu_ops = emu_build.build()
    from gradmem_fast import _ext

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_ext, "load", lambda: emu_ops)
        mp.setattr(_ext, "cuda_op_reason", lambda *tensors: None)
        yield emu_ops


FAMILY = {"gpt2-small": "gpt2", "llama1b": "llama", "kv": "llama"}


@pytest.mark.parametrize("name, B, layers_expected", [
    ("gpt2-latency", 1, 12), ("gpt2-batch", 4, 12), ("llama1b-latency", 1, 16), ("llama1b-batch", 4, 16),
    ("kv-latency", 1, 4), ("kv-paper", 4, 4)])
@pytest.mark.needs_triton
def test_standard_case_step_within_budget(emulated_csrc, name, B, layers_expected):
    case = get_case(name).resized(B=B)
    plan, step = count_case(case)
    family = FAMILY[case.config]
    assert len(step.per_layer()) == layers_expected - 1
    assert not over_budget(step, family, B), "\n".join(over_budget(step, family, B))
    budget, batched = BUDGET[family], int(B > 1)
    bound = budget["layer0"][batched] + budget["rest"][batched] + (layers_expected - 1) * budget["layer"]
    assert step.total() <= bound
    assert step.by("kind")["triton"] > 0 and step.by("kind")["csrc"] > 0  # every op ran on its kernel


def _family_counts(family, B):
    model = tiny_model(family, dtype=torch.float32, num_hidden_layers=3, **WIDE[family])
    ids, mask, memory = random_batch(model, B, 6, m=2, seed=1)
    memory = memory.expand(B, -1, -1).contiguous()
    return count_write(describe(model), ops_for("kernel"), ids, mask, memory, plan_ops=ops_for("auto"))[1]


@pytest.mark.parametrize("family", ["gpt_neox", "qwen3", "olmo2", "phi3", "gemma3_text"])
@pytest.mark.parametrize("B", [1, 3])
@pytest.mark.needs_triton
def test_family_step_within_budget(emulated_csrc, family, B):
    step = _family_counts(family, B)
    assert len(step.per_layer()) == 2
    assert not over_budget(step, family, B), "\n".join(over_budget(step, family, B))
    assert step.by("kind")["triton"] > 0 and step.by("kind")["csrc"] > 0


@pytest.mark.needs_triton
def test_an_extra_op_breaks_the_budget(emulated_csrc, monkeypatch):
    """The budget check can fail: one more launch per linear layer shows up in every phase."""
    case = get_case("kv-latency")
    _, step = count_case(case)
    assert not over_budget(step, "llama", 1)
    monkeypatch.setattr(sublayers, "linear", lambda x, lin: F.linear(x, lin.weight, lin.bias).clone())
    _, slower = count_case(case)
    assert slower.total() > step.total()
    errors = over_budget(slower, "llama", 1)
    assert any(e.startswith("layer 1:") for e in errors) and any(e.startswith("layer 0:") for e in errors)


def test_what_counts_as_a_launch():
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(0))
    counter = LaunchCounter()
    with counter:
        y = x.view(6, 4).t()  # views: none
        z = torch.empty(3, 5)  # allocation: none
        z.zero_()  # fill: one
        w = torch.matmul(y, torch.ones(6, 2))  # GEMM: one (plus an all-ones fill)
        x.add_(1.0)  # pointwise: one
        w.sum()  # reduction: one
    assert counter.by("kind") == {"aten": 5}
    assert counter.by("op") == {"zero_": 1, "ones": 1, "mm": 1, "add_": 1, "sum": 1}
    assert launch_kind(torch.ops.aten.view.default) is None
    assert launch_kind(torch.ops.aten._unsafe_view.default) is None
    assert launch_kind(torch.ops.aten.empty_strided.default) is None


def test_triton_launches_count_once_without_the_interpreters_work():
    pytest.importorskip("triton")
    from gradmem_fast.ops.head_loss import fused_head_loss

    g = torch.Generator().manual_seed(1)
    hidden, weight = torch.randn(5, 16, generator=g), torch.randn(11, 16, generator=g)
    targets, weights = torch.randint(0, 11, (5,), generator=g), torch.full((5,), 0.2)
    counter = LaunchCounter()
    with counter:
        fused_head_loss(hidden, weight, targets, weights, backend="kernel", validate=False)
    kinds = counter.by("kind")
    assert kinds["triton"] == 1  # the softmax-gradient kernel between two GEMMs (one chunk)
    assert counter.by("op")["mm"] == 2 and kinds["aten"] == 2
