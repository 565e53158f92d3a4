"""Counts the device launches of the fast writer's prologue (build_plan) and step (write_step), on any device.

What counts as one launch:
- an aten op that computes (GEMM, pointwise, reduction, copy, fill, gather/scatter, factory that fills);
- not: views and in-place metadata changes (`func.is_view`, `torch.Tag.inplace_view`) and the ops in
  NO_LAUNCH (allocations without a fill, detach and aliases);
- each csrc custom op (namespaces CSRC_NAMESPACES: the real extension or its CPU emulation), which
  issues one kernel per call; the aten ops it runs inside are not seen;
- each Triton kernel launch (`run` of a jitted or interpreted kernel); the Triton interpreter's own
  host-side torch work, issued inside that call, is not counted.
A GEMM counts as one even where cuBLAS splits it or copies a bias first. Counts depend on the layer
count, the family, B == 1 vs B > 1 and the options, not on widths or values, so tiny CPU models give
the launch count of the real ones (with op_backend "kernel": Triton under TRITON_INTERPRET=1 and the
csrc ops emulated on CPU).

Launches are attributed to phases by the engine function that issued them: "memory" (memory rows in
and their gradient out), "layer0", "layer i" (i >= 1, forward and backward), "head" (final norm, head
rows, loss) and "update" (the memory update).
"""
import collections
import contextlib
import sys
import threading

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
CSRC_NAMESPACES = ("gradmem_fast", "gradmem_fast_emu")
NO_LAUNCH = {  # allocations without a fill, aliases, metadata
    aten.empty, aten.empty_like, aten.empty_strided, aten.new_empty, aten.new_empty_strided, aten.resize_,
    aten.detach, aten.alias, aten.lift_fresh, aten._unsafe_view, aten._reshape_alias, aten.set_, aten.sym_size, aten.sym_stride, aten.sym_numel,
    aten.sym_storage_offset, aten.is_same_size,
}


def launch_kind(func):
    """"csrc", "aten" or None (no device launch) for an op seen by a TorchDispatchMode."""
    if func.namespace in CSRC_NAMESPACES:
        return "csrc"
    if func.is_view or torch.Tag.inplace_view in func.tags or func.overloadpacket in NO_LAUNCH:
        return None
    return "aten"


def _phase_codes():
    from . import layers, step
    return {layers.layer0_forward.__code__: "layer0", layers.layer0_backward.__code__: "layer0",
            layers.layer_forward.__code__: "layer", layers.layer_backward.__code__: "layer",
            step.memory_in.__code__: "memory", step.memory_in_backward.__code__: "memory",
            step.forward_backward.__code__: "head", step.write_step.__code__: "update"}


class LaunchCounter(TorchDispatchMode):
    """Counts launches by (phase, kind, op name). `layers`: the spec's layers, to name "layer i"."""

    def __init__(self, layers=()):
        super().__init__()
        self.counts = collections.Counter()
        self._layer_index = {id(layer): i for i, layer in enumerate(layers)}
        self._codes = _phase_codes()
        self._triton_depth = threading.local()

    def _phase(self):
        frame = sys._getframe(2)
        while frame is not None:
            phase = self._codes.get(frame.f_code)
            if phase == "layer":
                return f"layer {self._layer_index.get(id(frame.f_locals.get('layer')), '?')}"
            if phase is not None:
                return phase
            frame = frame.f_back
        return "other"

    def _in_triton(self):
        return getattr(self._triton_depth, "n", 0) > 0

    def record(self, kind, name):
        self.counts[(self._phase(), kind, name)] += 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self._in_triton():
            kind = launch_kind(func)
            if kind is not None:
                self.record(kind, str(func.overloadpacket).replace("aten.", "").replace("torch.ops.", ""))
        return func(*args, **(kwargs or {}))

    @contextlib.contextmanager
    def triton_launches(self):
        """Counts each Triton kernel launch while active; torch ops inside a launch are not counted."""
        classes = []
        try:
            from triton.runtime.jit import JITFunction
            classes.append(JITFunction)
            from triton.runtime.interpreter import InterpretedFunction
            classes.append(InterpretedFunction)
        except ImportError:
            pass
        counter, depth = self, self._triton_depth
        originals = {cls: cls.__dict__["run"] for cls in classes if "run" in cls.__dict__}

        def wrap(run):
            def counted_run(fn, *args, warmup=False, **kwargs):
                if not warmup and not counter._in_triton():
                    counter.record("triton", getattr(fn, "__name__", "kernel"))
                depth.n = getattr(depth, "n", 0) + 1
                try:
                    return run(fn, *args, warmup=warmup, **kwargs)
                finally:
                    depth.n -= 1
            return counted_run
        try:
            for cls, run in originals.items():
                cls.run = wrap(run)
            yield self
        finally:
            for cls, run in originals.items():
                cls.run = run

    def __enter__(self):
        self._triton_cm = self.triton_launches()
        self._triton_cm.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            self._triton_cm.__exit__(*exc)

    # ---------------------------------------------------------------- summaries

    def total(self, kind=None, phase=None):
        return sum(n for (p, k, _), n in self.counts.items()
                   if (kind is None or k == kind) and (phase is None or p == phase))

    def by(self, key):
        """Counter of launches keyed by "phase", "kind" or "op"."""
        i = ("phase", "kind", "op").index(key)
        out = collections.Counter()
        for k, n in self.counts.items():
            out[k[i]] += n
        return out

    def per_layer(self):
        """Launches of each layer >= 1 (all equal for one family), in layer order."""
        phases = self.by("phase")
        return [n for _, n in sorted((int(p.split()[1]), n) for p, n in phases.items() if p.startswith("layer ")
                                     and p.split()[1].isdigit())]


def count_write(spec, ops, input_ids, attention_mask, memory, *, write_head=None, memory_proj=None,
                clip_value=None, clip_norm=None, steps=1, plan_ops=None):
    """(plan counter, step counter) for build_plan once then `steps` write_step calls with `ops` (the step
    counter holds the last step's launches). plan_ops: the ops of build_plan (default `ops`), e.g. "auto"
    where a model-dtype rotary buffer sends the tables to their twin. memory (B, m, d) is updated in place."""
    from .plan import build_plan
    from .step import write_step

    B, m = memory.shape[:2]
    with torch.no_grad():
        plan_counter = LaunchCounter(spec.layers)
        with plan_counter:
            plan = build_plan(spec, plan_ops or ops, input_ids, attention_mask, m, memory.dtype, write_head,
                              memory_proj)
        plan.ops = ops
        lr = torch.full((), 0.5, dtype=torch.float32, device=memory.device)
        step_loss = torch.empty(B, dtype=torch.float32, device=memory.device)
        for _ in range(steps):
            step_counter = LaunchCounter(plan.spec.layers)  # the plan's (norm offsets folded, plan.py)
            with step_counter:
                write_step(plan, memory, lr, step_loss, clip_value, clip_norm)
    return plan_counter, step_counter
