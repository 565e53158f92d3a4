"""The CUDA-graph cache of the fast writer, checked on the CPU where possible: the cache key follows the
matmul settings a capture bakes in, a graph write on a second stream waits for the first one's replays,
and the eager loop runs with the tensors' device current. One GPU test runs two streams for real.
"""
import contextlib
from types import SimpleNamespace

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from engine_cases import WIDE, batch_with_memories, fake_cuda, model_on, model_pair
from gradmem_fast.engine import graphs
from gradmem_fast.engine.ops import ops_for
from gradmem_fast.engine.specs import spec_of
from gradmem_fast.engine.step import write_step
from gradmem_fast.models import describe
from helpers import rel_err


@pytest.mark.parametrize("setting, value", [("fp32_precision", "tf32"),
                                            ("allow_fp16_reduced_precision_reduction", None),
                                            ("allow_bf16_reduced_precision_reduction", None)])
def test_graph_key_follows_matmul_settings(setting, value):
    """A capture bakes in cuBLAS's math mode and the Triton kernels' fp32 dot precision: a cached graph
    must not be replayed after they change."""
    model = model_pair("llama")[0]
    spec, signature = spec_of(model)

    def key():
        return graphs.graph_key(model, spec, signature, ops_for("auto"), 2, 16, 32, 3, torch.float32, None, None,
                                None, None)

    matmul = torch.backends.cuda.matmul
    previous = getattr(matmul, setting)
    before = key()
    try:
        setattr(matmul, setting, (not previous) if value is None else value)
        assert key() != before
    finally:
        setattr(matmul, setting, previous)
    assert key() == before


class _Recorder:
    """Stand-ins for CUDA streams, events and graphs that log what each call enqueues, on which stream."""

    def __init__(self):
        self.log = []
        self.stream = "s1"
        self.events = 0
        self.device = None
        self.replay_devices = []

    @contextlib.contextmanager
    def device_context(self, device):
        previous, self.device = self.device, device
        try:
            yield
        finally:
            self.device = previous

    def current_stream(self, device=None):
        recorder = self

        class Stream:
            name = recorder.stream

            def wait_event(self, event):
                recorder.log.append((self.name, "wait", event.number))
        return Stream()

    def Event(self):
        recorder = self
        recorder.events += 1

        class Event:
            number = recorder.events

            def record(self, stream):
                recorder.log.append((stream.name, "record", self.number))
        return Event()

    def graph(self, name):
        recorder = self

        class Graph:
            def replay(self):
                recorder.log.append((recorder.stream, name))
                recorder.replay_devices.append(recorder.device)
        return Graph()


def test_graph_write_orders_calls_across_streams_on_the_tensors_device(monkeypatch):
    """A call on a second stream must not refill the static buffers (nor reuse the shared step pool) before
    the first call's replays are done: it waits on an event recorded after them."""
    recorder = _Recorder()
    monkeypatch.setattr(torch.cuda, "current_stream", recorder.current_stream)
    monkeypatch.setattr(torch.cuda, "Event", recorder.Event)
    monkeypatch.setattr(torch.cuda, "device", recorder.device_context)
    monkeypatch.setattr(graphs, "_LAST_WRITE", {})
    model = model_pair("llama")[0]
    spec, signature = spec_of(model)
    ids, mask, memory = batch_with_memories(model, 2, 5, [5, 2], 3, seed=1)
    Tb = graphs.bucket_length(5, 3)
    entry = graphs.GraphEntry(model_ref=lambda: model, ids=torch.empty(2, Tb, dtype=torch.int64),
                              mask=torch.empty(2, Tb, dtype=torch.int64), memory=torch.empty_like(memory),
                              lr=torch.empty(()), step_loss=torch.zeros(2), prologue=recorder.graph("prologue"),
                              step=recorder.graph("step"), plan=None)
    monkeypatch.setattr(graphs, "CACHE", SimpleNamespace(get=lambda key, model, build: entry))

    def call():
        return graphs.graph_write(model, spec, signature, ops_for("reference"), memory, ids, mask, steps=2, lr=0.5,
                                  write_head=None, memory_proj=None, clip_value=None, clip_norm=None,
                                  losses=torch.empty(2, 2), real_rows=7)

    out = call()
    assert torch.equal(out, memory) and torch.equal(entry.mask[:, :5], mask) and not entry.mask[:, 5:].any()
    assert recorder.log == [("s1", "prologue"), ("s1", "step"), ("s1", "step"), ("s1", "record", 1)]
    recorder.log.clear()
    recorder.stream = "s2"
    call()
    assert recorder.log == [("s2", "wait", 1), ("s2", "prologue"), ("s2", "step"), ("s2", "step"),
                            ("s2", "record", 2)]
    # capture and replay run with the tensors' device current (its streams, not another device's)
    assert recorder.replay_devices == [memory.device] * 6


@pytest.mark.gpu
def test_graph_writes_on_two_streams_match_eager():
    """Two calls of one cached graph entry issued back to back on two streams: the second call's refill of
    the static buffers must wait for the first call's replays."""
    from gradmem_fast.engine import fast_write

    model = model_on("llama", "cuda", **WIDE["llama"])
    batches = [tuple(t.cuda() for t in batch_with_memories(model, 4, 200, [200, 150, 90, 7], 8, seed=s)) for s in (1, 2)]

    def write(batch, use_graphs):
        ids, mask, memory = batch
        return fast_write(model, memory, ids, mask, steps=8, lr=0.3, grad_mode="none", return_losses=False,
                          op_backend="auto", use_graphs=use_graphs, write_head=None, memory_proj=None,
                          clip_value=None, clip_norm=None)

    expected = [write(b, False) for b in batches]
    write(batches[0], True)  # capture
    streams = [torch.cuda.Stream(), torch.cuda.Stream()]
    for stream in streams:
        stream.wait_stream(torch.cuda.current_stream())
    outs = []
    for batch, stream in zip(batches, streams):
        with torch.cuda.stream(stream):
            outs.append(write(batch, True))
    torch.cuda.synchronize()
    for out, ref in zip(outs, expected):
        assert rel_err(out, ref) < 1e-4


@pytest.mark.needs_cuda_build
def test_fast_write_runs_with_the_tensors_device_current(monkeypatch):
    """Triton launches on the current device: the eager loop (fake CUDA tensors here) runs each step with
    the tensors' device made current."""
    import gradmem_fast.engine.write as write_module

    recorder = _Recorder()
    monkeypatch.setattr(torch.cuda, "device", recorder.device_context)
    step_devices = []

    def recorded_step(*args, **kwargs):
        step_devices.append(recorder.device)
        return write_step(*args, **kwargs)
    monkeypatch.setattr(write_module, "write_step", recorded_step)
    model = model_pair("gpt2")[0]
    ids, mask, memory = batch_with_memories(model, 2, 5, [5, 2], 3, seed=1)
    spec = describe(model)
    mode, memo = FakeTensorMode(), {}
    with mode:
        spec = fake_cuda(spec, mode, memo)
        monkeypatch.setattr(write_module, "spec_of", lambda model: (spec, None))
        ids, memory = (fake_cuda(t, mode, memo) for t in (ids, memory))
        # no mask: fast_write reads a mask's sum on the host (the head row count), which fake tensors lack
        out, losses = write_module.fast_write(model, memory, ids, None, steps=2, lr=0.5, write_head=None,
                                              memory_proj=None, clip_value=None, clip_norm=None, grad_mode="none",
                                              return_losses=True, op_backend="reference", use_graphs=False)
    assert out.device == memory.device and losses.shape == (2, 2)
    assert step_devices == [memory.device] * 2
