"""The fast writer's prologue (build_plan) and step (write_step) are capturable in a CUDA graph, checked on
the CPU: every aten op they issue is recorded by a TorchDispatchMode, and any op that would synchronise the
host, give a shape that depends on tensor values, or read host memory inside a captured region fails.

Three runs: CPU tensors with the PyTorch twins; CPU tensors with the Triton kernels under the interpreter
(op_backend "auto": "kernel" would raise for the csrc ops on CPU tensors; only ops issued outside the
triton package are checked and traced, as the interpreter's host-side work stands for the device's);
and fake CUDA tensors (FakeTensorMode, no GPU needed), where device moves and host tensors mixed into
device ops become visible. Two inputs with equal shapes and other values (ids, lengths, memory) must
give identical op traces: every shape is a function of B, T, m, d, R. A step must not replace any
tensor the plan holds (it would live in the step graph's pool). The graph cache's key and the ordering
of graph writes across streams are in test_engine_graph_streams.py.
"""
import dataclasses
import os
import sys
from types import SimpleNamespace

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

import gradmem_fast.ops.attention as attention
import gradmem_fast.ops.geglu as geglu
import gradmem_fast.ops.head_loss as head_loss
import gradmem_fast.ops.qk_norm as qk_norm
from engine_cases import WIDE, batch_with_memories, cast, fake_cuda, make_options, model_pair
from gradmem_fast.engine.ops import ops_for
from gradmem_fast.engine.plan import build_plan
from gradmem_fast.engine.step import write_step
from gradmem_fast.models import describe
from helpers import FAMILIES

aten = torch.ops.aten
OPTIONS = ("write_head", "memory_proj", "clip_value", "clip_norm")

# ops that read a value back to the host or whose output shape depends on tensor values
SYNCING = {
    aten._local_scalar_dense: "reads a tensor value back to the host (.item(), float(t), bool(t), if t:)",
    aten.is_nonzero: "reads a tensor value back to the host",
    aten.equal: "compares on the host",
    aten.allclose: "compares on the host",
    aten.nonzero: "output shape depends on tensor values",
    aten.masked_select: "output shape depends on tensor values",
    aten.bincount: "output shape depends on tensor values",
    aten._unique: "output shape depends on tensor values",
    aten._unique2: "output shape depends on tensor values",
    aten.unique_dim: "output shape depends on tensor values",
    aten.unique_consecutive: "output shape depends on tensor values",
    aten.unique_dim_consecutive: "output shape depends on tensor values",
    aten.lift_fresh: "tensor made from Python data (a host-to-device copy on CUDA)",
    aten.lift_fresh_copy: "tensor made from Python data (a host-to-device copy on CUDA)",
}
INDEXING = (aten.index, aten.index_put, aten.index_put_, aten._index_put_impl_)
COPIES = (aten.copy_, aten._copy_from, aten._copy_from_and_resize)


def _triton_dir():
    try:
        import triton
    except ImportError:
        return None
    return os.path.dirname(os.path.abspath(triton.__file__)) + os.sep


TRITON_DIR = _triton_dir()


def _tensors(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v)


def hazard(func, args, kwargs):
    """Why `func(*args, **kwargs)` cannot run inside a captured CUDA graph, or None."""
    packet = func.overloadpacket
    if packet in SYNCING:
        return SYNCING[packet]
    if packet is aten.repeat_interleave and func is aten.repeat_interleave.Tensor \
            and kwargs.get("output_size") is None:
        return "repeat_interleave with tensor repeats and no output_size reads the total back"
    if packet in INDEXING and any(t.dtype in (torch.bool, torch.uint8) for t in _tensors(args[1])):
        return "boolean-mask indexing: the output shape depends on tensor values"
    if packet is aten._to_copy and kwargs.get("device") is not None \
            and torch.device(kwargs["device"]) != args[0].device:
        return f"copies from {args[0].device} to {kwargs['device']}"
    if packet in COPIES and args[1].device != args[0].device:
        return f"copies from {args[1].device} to {args[0].device}"
    devices = {t.device.type for t in _tensors((args, kwargs))}
    if "cpu" in devices and len(devices) > 1:
        return "a host tensor is read by a device op (its value would be frozen into the graph)"
    return None


def _issued_by_triton():
    frame = sys._getframe(2)
    while frame is not None:
        if TRITON_DIR is not None and frame.f_code.co_filename.startswith(TRITON_DIR):
            return True
        frame = frame.f_back
    return False


def _stack():
    """The calling lines outside torch and pytest, innermost first, as 'file:line'."""
    frame, stack = sys._getframe(2), []
    while frame is not None:
        name = frame.f_code.co_filename
        if os.sep + "torch" + os.sep not in name and "pytest" not in name and "pluggy" not in name:
            stack.append(f"{os.path.basename(name)}:{frame.f_lineno}")
        frame = frame.f_back
    return stack


class CaptureChecker(TorchDispatchMode):
    """Records every aten op, with its output shapes, and each hazard. skip_triton: ignore the ops issued
    from inside the triton package (the interpreter's host-side work)."""

    def __init__(self, skip_triton=False):
        super().__init__()
        self.skip_triton = skip_triton
        self.trace = []
        self.hazards = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        in_triton = self.skip_triton and _issued_by_triton()
        if not in_triton:
            why = hazard(func, args, kwargs)
            if why is not None:
                self.hazards.append(f"{func}: {why} (at {' < '.join(_stack()[:6])})")
        out = func(*args, **kwargs)
        if not in_triton:
            self.trace.append((str(func), tuple(tuple(t.shape) for t in _tensors(out))))
        return out


def checked(fn, *args, skip_triton=False, **kwargs):
    """(result or the exception raised, checker) of fn run under a CaptureChecker."""
    checker = CaptureChecker(skip_triton)
    with checker:
        try:
            result = fn(*args, **kwargs)
        except Exception as exc:  # fake tensors refuse data-dependent ops after the checker saw them
            result = exc
    return result, checker


# ---------------------------------------------------------------- the checker itself


def _item(x):
    return x * x.sum().item()


def _float_and_branch(x):
    if x.sum() > 0:
        return x * float(x.max())
    return x


def _bool_mask(x):
    return x[x > 0]


def _bool_mask_put(x):
    y = x.clone()
    y[x > 0] = 0.0
    return y


def _nonzero(x):
    return x.index_select(0, (x[:, 0] > 0).nonzero()[:, 0])


def _python_data(x):
    return x * torch.tensor([1.0, 2.0, 3.0])


def _tensor_repeats(x):
    return x.repeat_interleave(torch.tensor([1, 2, 1, 1]), dim=0)


def _clean(x):
    y = torch.where(x > 0, x, 0.5 * x).repeat_interleave(2, dim=0)
    return y.index_select(0, torch.arange(4, device=x.device)) + x.sum(1, keepdim=True).clamp(max=1.0)


@pytest.mark.parametrize("fn", [_item, _float_and_branch, _bool_mask, _bool_mask_put, _nonzero, _python_data,
                                _tensor_repeats])
@pytest.mark.parametrize("fake_cuda", [False, True])
@pytest.mark.needs_cuda_build
def test_checker_fails_on_host_sync(fn, fake_cuda):
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    if fake_cuda:
        with FakeTensorMode() as mode:
            x = mode.from_tensor(x).to("cuda")
            _, checker = checked(fn, x)
    else:
        _, checker = checked(fn, x)
    assert checker.hazards, f"{fn.__name__} was not flagged; ops seen: {checker.trace}"


def test_checker_names_the_op_and_the_line():
    _, checker = checked(_item, torch.ones(2))
    assert len(checker.hazards) == 1
    assert "_local_scalar_dense" in checker.hazards[0] and "test_engine_capture_safety.py" in checker.hazards[0]


@pytest.mark.parametrize("move", [lambda x: x.cpu() * 2, lambda x: x + torch.ones(3).to("cuda"),
                                  lambda x: x * torch.ones((), dtype=x.dtype), lambda x: x.new_empty(3).copy_(
                                      torch.ones(3))])
@pytest.mark.needs_cuda_build
def test_checker_fails_on_device_moves(move):
    with FakeTensorMode() as mode:
        x = mode.from_tensor(torch.ones(3)).to("cuda")
        _, checker = checked(move, x)
    assert checker.hazards, f"not flagged; ops seen: {checker.trace}"


@pytest.mark.parametrize("fake_cuda", [False, True])
@pytest.mark.needs_cuda_build
def test_checker_passes_capturable_code(fake_cuda):
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    if fake_cuda:
        with FakeTensorMode() as mode:
            x = mode.from_tensor(x).to("cuda")
            _, checker = checked(_clean, x)
    else:
        _, checker = checked(_clean, x)
    assert not checker.hazards and checker.trace


# ---------------------------------------------------------------- the engine


def _plan_tensors(value, path="plan"):
    """(path, tensor) for every tensor the plan holds, the model spec and the ops left out."""
    if isinstance(value, torch.Tensor):
        yield path, value
    elif dataclasses.is_dataclass(value):
        for f in dataclasses.fields(value):
            if f.name not in ("spec", "ops"):
                yield from _plan_tensors(getattr(value, f.name), f"{path}.{f.name}")
    elif isinstance(value, tuple):
        for i, v in enumerate(value):
            yield from _plan_tensors(v, f"{path}[{i}]")


def run_checked(spec, backend, ids, mask, memory, options, steps, device="cpu"):
    """build_plan then `steps` write_step calls, each under its own CaptureChecker.
    Returns (plan checker, step checkers, memory after the steps)."""
    B, m = memory.shape[:2]
    ops = ops_for(backend)
    skip_triton = backend != "reference"
    with torch.no_grad():
        plan, plan_check = checked(build_plan, spec, ops, ids, mask, m, memory.dtype, options.get("write_head"),
                                   options.get("memory_proj"), skip_triton=skip_triton)
        if isinstance(plan, Exception):
            raise AssertionError("build_plan:\n" + "\n".join(plan_check.hazards)) from plan
        lr = torch.full((), 0.5, dtype=torch.float32, device=device)
        step_loss = torch.empty(B, dtype=torch.float32, device=device)
        step_checks = []
        held = {path: id(t) for path, t in _plan_tensors(plan)}
        assert len(held) > 10
        for _ in range(steps):
            error, check = checked(write_step, plan, memory, lr, step_loss, options.get("clip_value"),
                                   options.get("clip_norm"), skip_triton=skip_triton)
            if isinstance(error, Exception):
                check.hazards.append(f"write_step raised {error!r}")
            # a tensor the step allocates lives in the step graph's pool, reused by other captures
            replaced = [path for path, t in _plan_tensors(plan) if held.get(path) != id(t)]
            if replaced or len(held) != len(list(_plan_tensors(plan))):
                check.hazards.append(f"write_step replaced tensors the plan holds: {replaced}")
            step_checks.append(check)
    return plan_check, step_checks, memory


def assert_capturable(plan_check, step_checks):
    assert not plan_check.hazards, "build_plan:\n" + "\n".join(plan_check.hazards)
    for k, check in enumerate(step_checks):
        assert not check.hazards, f"write_step {k}:\n" + "\n".join(check.hazards)
        assert check.trace == step_checks[0].trace, f"write_step {k} issues other ops than step 0"


def _options(family, names, seed=5, **overrides):
    model64 = model_pair(family, **overrides)[1]
    return cast(make_options(model64, names, seed=seed), torch.float32)


CASES = [(1, 7, None, 3), (3, 9, [9, 4, 1], 2)]  # (B, T, lengths, m)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("B, T, lengths, m, option_names", [CASES[0] + (OPTIONS,), CASES[1] + (OPTIONS,),
                                                            CASES[1] + ((),)])
def test_reference_engine_is_capturable(family, B, T, lengths, m, option_names):
    model = model_pair(family)[0]
    spec = describe(model)
    options = _options(family, option_names)
    ids, mask, memory = batch_with_memories(model, B, T, lengths, m, seed=2)
    start = memory.clone()
    plan_check, step_checks, memory = run_checked(spec, "reference", ids, mask, memory, options, steps=2)
    assert_capturable(plan_check, step_checks)
    assert not torch.equal(memory, start)
    # other values, same shapes (other lengths too): the same ops on the same shapes
    other_lengths = None if lengths is None else [1, T, 3]
    ids2, mask2, memory2 = batch_with_memories(model, B, T, other_lengths, m, seed=7)
    plan_check2, step_checks2, _ = run_checked(spec, "reference", ids2, mask2, memory2, options, steps=1)
    assert plan_check2.trace == plan_check.trace
    assert step_checks2[0].trace == step_checks[0].trace


def _refuse(name):
    def twin(*args, **kwargs):
        raise AssertionError(f"{name} fell back to its PyTorch twin")
    return twin


@pytest.mark.parametrize("family, B, T, lengths, m", [("llama", 1, 5, None, 2), ("llama", 2, 6, [6, 3], 2),
                                                     ("gpt2", 2, 6, [6, 3], 2), ("gpt_neox", 2, 6, [6, 3], 2),
                                                     ("qwen3", 2, 6, [6, 3], 2), ("olmo2", 1, 5, None, 2),
                                                     ("phi3", 2, 6, [6, 3], 2), ("gemma3_text", 2, 6, [6, 3], 2)])
@pytest.mark.needs_triton
def test_kernel_engine_is_capturable(family, B, T, lengths, m, monkeypatch):
    """The Triton kernels (interpreter) for attention and head + loss. The csrc ops take their twins here:
    op_backend="kernel" would raise on CPU tensors, so "auto" is used and the twins of the Triton ops are
    made to fail, proving the kernels ran."""
    for module, names in ((attention, ("attention_forward", "attention_backward", "context_attention_state",
                                       "memory_attention_forward", "memory_attention_backward")),
                          (head_loss, ("fused_head_loss",)), (qk_norm, ("qk_norm_forward", "qk_norm_backward")),
                          (geglu, ("geglu_forward", "geglu_backward"))):
        for name in names:
            monkeypatch.setattr(module, name + "_reference", _refuse(name))
    model = model_pair(family, **WIDE[family])[0]
    spec = describe(model)
    options = _options(family, OPTIONS, **WIDE[family])
    ids, mask, memory = batch_with_memories(model, B, T, lengths, m, seed=3)
    plan_check, step_checks, _ = run_checked(spec, "auto", ids, mask, memory, options, steps=2)
    assert_capturable(plan_check, step_checks)
    ids2, mask2, memory2 = batch_with_memories(model, B, T, None if lengths is None else [2, 6], m, seed=8)
    _, step_checks2, _ = run_checked(spec, "auto", ids2, mask2, memory2, options, steps=1)
    assert step_checks2[0].trace == step_checks[0].trace


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("B, T, lengths, m", CASES)
@pytest.mark.needs_cuda_build
def test_engine_on_fake_cuda_is_capturable(family, B, T, lengths, m):
    """Fake CUDA tensors: a device move, a host tensor in a device op or a value read back shows here."""
    model = model_pair(family)[0]
    spec = describe(model)
    options = _options(family, OPTIONS)
    ids, mask, memory = batch_with_memories(model, B, T, lengths, m, seed=4)
    mode, memo = FakeTensorMode(), {}
    with mode:
        spec = fake_cuda(spec, mode, memo)
        proj = options["memory_proj"]
        options["memory_proj"] = SimpleNamespace(weight=fake_cuda(proj.weight, mode, memo),
                                                 bias=fake_cuda(proj.bias, mode, memo))
        options["write_head"] = fake_cuda(options["write_head"], mode, memo)
        ids, mask, memory = (fake_cuda(t, mode, memo) for t in (ids, mask, memory))
        assert spec.embedding.device.type == "cuda" and spec.layers[-1].down.weight.device.type == "cuda"
        plan_check, step_checks, _ = run_checked(spec, "reference", ids, mask, memory, options, steps=2,
                                                 device="cuda")
    assert_capturable(plan_check, step_checks)
    assert len(step_checks[0].trace) > 50
